"""PostgreSQL statements that do a payment's several writes in one round trip (data-modifying CTEs).

Each is built once per shape and reused: SQLAlchemy then compiles it once, and asyncpg prepares it once
per connection. SQLite has no data-modifying CTEs; core.payments and core.provider_events run the same writes one by one
there.
"""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import String, and_, bindparam, cast, func, insert, literal, null, select, union_all
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import aliased

from core.db import table_of
from core.models import AuditEvent, Cooperative, Member, OutboxJob, Payment, PaymentType, ProviderEvent
from core.outbox import NewJob
from core.references import next_number, sql_reference


@functools.cache
def create_statement(reserved: bool, job_count: int) -> Any:
    """WITH [n AS (SELECT nextval)], p AS (INSERT payment ON CONFLICT (cooperative, key) DO NOTHING
    RETURNING ...), audited AS (INSERT audit row FROM p), queued AS (INSERT the jobs FROM p) SELECT
    reference FROM p. Parameters: p_<column> (p_reference only when `reserved`, else ref_prefix), a_actor,
    a_channel, a_after, a_at, and j<n>_<column> for each job (NewJob.row())."""
    table, audit, outbox = table_of(Payment), table_of(AuditEvent), table_of(OutboxJob)
    columns = [c.name for c in table.c]
    source: list[Any] = []
    number = None
    if not reserved:
        number = select(next_number().label("v")).cte("n")
    for name in columns:
        if name == "reference" and number is not None:
            source.append(sql_reference(bindparam("ref_prefix", type_=String), number.c.v))
        else:
            source.append(bindparam(f"p_{name}", type_=table.c[name].type))
    rows = select(*source)
    if number is not None:
        rows = rows.select_from(number)
    created = (postgresql.insert(table).from_select(columns, rows)
               .on_conflict_do_nothing(index_elements=["cooperative_id", "idempotency_key"])
               .returning(table.c.reference, table.c.id, table.c.cooperative_id).cte("p"))
    after = cast(bindparam("a_after", type_=audit.c.after.type), postgresql.JSONB).op("||")(
        func.jsonb_build_object("reference", created.c.reference))
    audited = insert(audit).from_select(
        ["cooperative_id", "actor", "channel", "action", "entity_type", "entity_id", "before", "after", "at"],
        select(created.c.cooperative_id, bindparam("a_actor", type_=audit.c.actor.type),
               bindparam("a_channel", type_=audit.c.channel.type), literal("payment.created"),
               literal("payment"), created.c.id, null(), after,
               bindparam("a_at", type_=audit.c.at.type)).select_from(created)).cte("audited")
    job_columns = list(NewJob.COLUMNS)
    job_rows = [select(*(bindparam(f"j{n}_{c}", type_=outbox.c[c].type) for c in job_columns)).select_from(created)
                for n in range(job_count)]
    queued = (postgresql.insert(outbox).from_select(job_columns, union_all(*job_rows))
              .on_conflict_do_nothing(index_elements=["dedupe_key"]).cte("queued"))
    return select(created.c.reference).add_cte(audited).add_cte(queued)


@functools.cache
def stored_and_locked(by_transaction: bool, lock_id: bool = False) -> Any:
    """WITH e AS (INSERT provider event ON CONFLICT DO NOTHING RETURNING id) SELECT payment, (SELECT id
    FROM e) FOR UPDATE OF payments. Parameters: e_<column>, provider, reference (the payment's provider
    reference, or its provider transaction id when `by_transaction`).

    `lock_id`: the payment's row locked first, then the transaction id's lock (parameter id_key, the key of
    core.transaction_ids' _ID_LOCK), taken only when a payment is found, and another payment of the provider holding
    the id (parameter id_txn) looked for under it: WITH ..., p AS MATERIALIZED (SELECT ... FOR UPDATE) SELECT p.*,
    gateway_id_holder(:id_key, :provider, :id_txn, p.id) FROM p (migration 0029: the lock, then the probe with a
    snapshot of its own, which sees what the lock waited for). The outer projection runs on the rows the CTE gives,
    each locked already: the order every path takes the two locks in (see _held_elsewhere)."""
    table = table_of(ProviderEvent)
    columns = ["id", "provider", "event_id", "kind", "status", "payload", "received_at"]
    stored = (postgresql.insert(table)
              .values({c: bindparam(f"e_{c}", type_=table.c[c].type) for c in columns})
              .on_conflict_do_nothing(index_elements=["provider", "event_id"])
              .returning(table.c.id).cte("e"))
    column = Payment.provider_transaction_id if by_transaction else Payment.provider_reference
    locked = (select(Payment, select(stored.c.id).scalar_subquery().label("event_row_id"))
              .where(Payment.provider == bindparam("provider"), column == bindparam("reference"))
              .with_for_update(of=table_of(Payment)))
    if not lock_id:
        return locked
    rows = locked.cte("p").prefix_with("MATERIALIZED", dialect="postgresql")
    return select(aliased(Payment, rows), rows.c.event_row_id,
                  func.gateway_id_holder(bindparam("id_key", type_=String), bindparam("provider", type_=String),
                                         bindparam("id_txn", type_=String), rows.c.id, type_=String).label("id_holder"))


# The cooperative, its payment type (only if it is the cooperative's), the member (only if theirs, with their
# status: a pending or suspended member cannot pay) and the paying member: the cooperative's ACTIVE member whose
# registered number has the blind index payer_index (at most one: unique per cooperative; core.payments attaches
# an API payment that names no member to them, as USSD does the dialling member). In the same query: the hot
# path's one read stays one.
# Parameters: coop_id, type_id, member_id (None: no member), payer_index (None: no lookup). One row, or none
# without the cooperative.
_PAYER = aliased(Member, name="payer")
CONTEXT = (
    select(Cooperative.id.label("coop_id"), Cooperative.status.label("coop_status"), Cooperative.country,
           Cooperative.timezone, PaymentType.id.label("type_id"), PaymentType.cooperative_id.label("type_coop"),
           PaymentType.name,
           PaymentType.amount_minor, PaymentType.currency, PaymentType.allow_custom_amount, PaymentType.is_active,
           Member.id.label("member_id"), Member.status.label("member_status"), _PAYER.id.label("payer_id"))
    .select_from(Cooperative)
    .outerjoin(PaymentType, and_(PaymentType.id == bindparam("type_id", type_=String),
                                 PaymentType.cooperative_id == Cooperative.id))
    .outerjoin(Member, and_(Member.id == bindparam("member_id", type_=String), Member.cooperative_id == Cooperative.id))
    .outerjoin(_PAYER, and_(_PAYER.phone_index == bindparam("payer_index", type_=String),
                            _PAYER.cooperative_id == Cooperative.id, _PAYER.status == "ACTIVE"))
    .where(Cooperative.id == bindparam("coop_id", type_=String))
)
