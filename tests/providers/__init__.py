"""Provider adapter, simulator and callback route tests."""
