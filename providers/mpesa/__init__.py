"""Safaricom M-Pesa Daraja: the adapter and a simulator that speaks the same protocol."""

from providers.mpesa.adapter import MpesaAdapter

__all__ = ["MpesaAdapter"]
