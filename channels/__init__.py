"""Edges that talk to people: USSD sessions and SMS."""
