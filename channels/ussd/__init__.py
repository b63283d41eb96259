"""USSD channel: aggregator adapters, Redis sessions, the menu engine, screens and translations."""
