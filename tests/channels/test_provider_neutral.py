"""Channels speak to providers through the registry and core ports only: no channel module imports a provider's
own package (channels.sms.templates asked providers.mpesa.adapter.is_receipt whether an id was a receipt)."""

from __future__ import annotations

import ast
from pathlib import Path

from core.config import PROVIDER_NAMES

CHANNELS = Path(__file__).resolve().parents[2] / "channels"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_no_channel_imports_a_provider_package() -> None:
    own = tuple(f"providers.{name}" for name in PROVIDER_NAMES)
    found = {f"{path.relative_to(CHANNELS.parent)}: {name}" for path in CHANNELS.rglob("*.py")
             for name in _imports(path) if name in own or name.startswith(tuple(f"{p}." for p in own))}
    assert not found, sorted(found)
