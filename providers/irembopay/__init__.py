"""IremboPay (Rwanda): the adapter and a simulator that speaks the same protocol."""

from providers.irembopay.adapter import IremboPayAdapter, redis_nonce_store

__all__ = ["IremboPayAdapter", "redis_nonce_store"]
