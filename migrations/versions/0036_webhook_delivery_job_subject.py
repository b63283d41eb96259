"""The webhook.deliver jobs queued before their payload named the payment or refund they are about get it from their
delivery row: GET /v1/jobs showed them `subject: null`, and ?paymentId= / ?refundId= missed them.

core.webhooks.fan_out now writes the event's subject in each delivery's job (payment_id or refund_id:
core.outbox.SUBJECT_KEYS), because a digested event id (core.webhooks.stored_event_id: a flag's, a review's, reported
money's, "evt_" and 48 hex digits) no longer names it (core.outbox.job_subject). A job queued before holds only its
endpoint and that digest; its delivery row (webhook_deliveries, the same endpoint_id and event_id, its unique key)
keeps the event, whose data's id is its payment's or refund's (core.webhooks.event_subject: the type's first word).
A job whose event id is not a digest names its subject already, and a dispute's event has none: left as they are.
A job whose delivery row is gone (retention) cannot be told, and goes with retention too.

One UPDATE of those jobs (any status: a DONE one is listed too), on PostgreSQL in a transaction of its own, as 0033's
backfill: a job written no longer matches, so it may be run again (a `migrate` cut short resumes). Its read goes
through the webhook.deliver jobs (no index names the kind: a sequential read of outbox_jobs, once) and, for the few
with a digest, their delivery by its unique key. Downgrading changes nothing: the release before reads the key as
this one does, and one before that ignores it.

Revision ID: 0036
Revises: 0035
"""

from alembic import op

revision = '0036'
down_revision = '0035'
branch_labels = None
depends_on = None

# The SQL is written out whole (a released revision never changes). A digest: "evt_" then no other "_" (an event id
# made by core.notify or core.provider_events has its type's and its id's after it), 52 characters.
KEY = "CASE WHEN d.event_type LIKE 'payment.%' THEN 'payment_id' ELSE 'refund_id' END"
POSTGRESQL = f"""
UPDATE outbox_jobs AS j SET payload = j.payload || jsonb_build_object({KEY}, d.payload #>> '{{data,id}}')
FROM webhook_deliveries AS d
WHERE j.kind = 'webhook.deliver'
  AND j.payload ->> 'payment_id' IS NULL AND j.payload ->> 'refund_id' IS NULL
  AND length(j.payload ->> 'event_id') = 52 AND j.payload ->> 'event_id' LIKE 'evt!_%' ESCAPE '!'
  AND j.payload ->> 'event_id' NOT LIKE 'evt!_%!_%' ESCAPE '!'
  AND d.endpoint_id = j.payload ->> 'endpoint_id' AND d.event_id = j.payload ->> 'event_id'
  AND (d.event_type LIKE 'payment.%' OR d.event_type LIKE 'refund.%')
  AND jsonb_typeof(d.payload #> '{{data,id}}') = 'string' AND d.payload #>> '{{data,id}}' <> ''"""
SQLITE = f"""
UPDATE outbox_jobs AS j SET payload = json_set(j.payload, '$.' || {KEY}, json_extract(d.payload, '$.data.id'))
FROM webhook_deliveries AS d
WHERE j.kind = 'webhook.deliver'
  AND json_extract(j.payload, '$.payment_id') IS NULL AND json_extract(j.payload, '$.refund_id') IS NULL
  AND length(json_extract(j.payload, '$.event_id')) = 52
  AND json_extract(j.payload, '$.event_id') LIKE 'evt!_%' ESCAPE '!'
  AND json_extract(j.payload, '$.event_id') NOT LIKE 'evt!_%!_%' ESCAPE '!'
  AND d.endpoint_id = json_extract(j.payload, '$.endpoint_id') AND d.event_id = json_extract(j.payload, '$.event_id')
  AND (d.event_type LIKE 'payment.%' OR d.event_type LIKE 'refund.%')
  AND json_type(d.payload, '$.data.id') = 'text' AND json_extract(d.payload, '$.data.id') <> ''"""


def upgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        with op.get_context().autocommit_block():
            op.execute(POSTGRESQL)
    else:
        op.execute(SQLITE)


def downgrade() -> None:
    pass
