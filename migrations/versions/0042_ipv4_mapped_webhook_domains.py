"""A webhook domain that is an IPv4-mapped IPv6 address is written `::ffff:1.2.3.4`, whatever the interpreter.

0040 (and the release's code) wrote an IP domain as Python's ipaddress does (str()), and that changed for IPv4-mapped
addresses in Python 3.13: `::ffff:102:304` on 3.11 and 3.12, `::ffff:1.2.3.4` from 3.13 on. A gateway moved to
another Python matched none of such a domain's endpoints (their events not recorded, their deliveries held). The
release writes it in the second form (RFC 5952's) on every Python (core.webhooks.canonical_host); a domain stored in
the other is rewritten so here, unless the cooperative has that form too (that row then decides, as 0040's did).
Such a domain is the embedded default's (a receiver on `::ffff:127.0.0.1`): WEBHOOK_PRIVATE_NETWORKS lists no
IPv4-mapped network.

A downgrade writes them again as the previous release compares them on the Python it runs on (str()).

Revision ID: 0042
Revises: 0041
"""

import ipaddress
from collections.abc import Callable

import sqlalchemy as sa
from alembic import op

revision = '0042'
down_revision = '0041'
branch_labels = None
depends_on = None


def upgrade() -> None:
    _rewrite(_mapped, compared=str)


def downgrade() -> None:
    _rewrite(str, compared=_mapped)


def _mapped(address: ipaddress.IPv6Address) -> str:
    return f'::ffff:{address.ipv4_mapped}' + (f'%{address.scope_id}' if address.scope_id else '')


def _rewrite(written: Callable[[ipaddress.IPv6Address], str],
             compared: Callable[[ipaddress.IPv6Address], str]) -> None:
    """`compared`: the form the release before this step compared a domain in. Its row is rewritten first, so that
    of two rows of one address (a second request 0040 left as typed, its form taken) it goes on deciding."""
    bind = op.get_bind()
    rows = []
    for row_id, cooperative_id, domain in bind.execute(
            sa.text("SELECT id, cooperative_id, domain FROM approved_domains WHERE domain LIKE '%:%'")).all():
        try:
            address = ipaddress.IPv6Address(domain)
        except ValueError:
            continue
        if address.ipv4_mapped is not None and written(address) != domain:
            rows.append((compared(address) != domain, row_id, cooperative_id, written(address)))
    for _, row_id, cooperative_id, domain in sorted(rows, key=lambda row: row[0]):
        taken = bind.execute(sa.text("SELECT 1 FROM approved_domains WHERE cooperative_id = :c AND domain = :d"),
                             {"c": cooperative_id, "d": domain}).first()
        if taken is None:
            bind.execute(sa.text("UPDATE approved_domains SET domain = :d WHERE id = :i"), {"d": domain, "i": row_id})
