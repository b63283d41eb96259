"""Airtel Money Open API: collections, status enquiry, signed callbacks and full refunds."""

from providers.airtel.adapter import AirtelAdapter

__all__ = ["AirtelAdapter"]
