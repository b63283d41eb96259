"""Domain core of the gateway: money, members, payments, refunds, disputes, outbox."""
