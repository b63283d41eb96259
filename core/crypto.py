"""PII protection: AES-GCM encryption with key ids for rotation, HMAC blind indexes for lookup."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import uuid
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


class CryptoError(Exception):
    """Ciphertext that cannot be decrypted with any configured key."""


class PiiCipher:
    """Encrypts short strings as 'keyid:base64(nonce|ciphertext)'; any configured key decrypts."""

    def __init__(self, keys: Mapping[str, bytes], active_key_id: str, blind_index_key: str) -> None:
        if active_key_id not in keys:
            raise ValueError("active key id is not among the keys")
        self._keys = {kid: AESGCM(k) for kid, k in keys.items()}
        self._active = active_key_id
        self._index_key = blind_index_key.encode()

    @property
    def active_key_id(self) -> str:
        return self._active

    def encrypt(self, plaintext: str, *, context: str = "") -> str:
        nonce = os.urandom(12)
        sealed = self._keys[self._active].encrypt(nonce, plaintext.encode(), context.encode() or None)
        return f"{self._active}:{base64.b64encode(nonce + sealed).decode()}"

    def decrypt(self, token: str, *, context: str = "") -> str:
        key_id, sep, body = token.partition(":")
        aead = self._keys.get(key_id)
        if not sep or aead is None:
            raise CryptoError(f"unknown key id {key_id!r}")
        try:
            raw = base64.b64decode(body, validate=True)
            return aead.decrypt(raw[:12], raw[12:], context.encode() or None).decode()
        except (InvalidTag, ValueError):  # binascii.Error and a short nonce are ValueErrors
            raise CryptoError("ciphertext does not verify") from None

    def blind_index(self, value: str, *, purpose: str = "phone") -> str:
        """Deterministic keyed hash for equality lookups without storing the clear value."""
        return hmac.new(self._index_key, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()

    def request_id(self, parts: list[str], *, purpose: str) -> str:
        """A provider request id derived from `parts` (the same parts, the same id, e.g. after a restore lost the
        first request's row), under the blind-index key, in uuid4's form (MTN takes only those)."""
        return str(uuid.UUID(hex=self.blind_index(json.dumps(parts), purpose=purpose)[:32], version=4))


def hash_api_key(key: str) -> str:
    """API keys are random and long, so one SHA-256 is enough (no dictionary to attack)."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_api_key(prefix: str = "cpk") -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


def hash_password(password: str) -> str:
    """scrypt with a random salt: slow on purpose, stored as scrypt$n$r$p$salt$hash."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32)
    salt_b64, digest_b64 = base64.b64encode(salt).decode(), base64.b64encode(digest).decode()
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${salt_b64}${digest_b64}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt_b64, digest_b64 = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    digest = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt_b64), n=int(n), r=int(r),
                            p=int(p), dklen=32)
    return hmac.compare_digest(digest, base64.b64decode(digest_b64))


def sign_hmac_hex(secret: str | bytes, message: bytes) -> str:
    key = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(key, message, hashlib.sha256).hexdigest()
