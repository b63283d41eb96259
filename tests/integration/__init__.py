"""Integration tests: the gateway as real processes against real PostgreSQL, Redis and simulators."""
