"""The pay funnel of each session (home -> pay type -> confirm -> done), counted once per step for /ops.

The session remembers how far it got and what it has already counted in `data["f"]` =
[steps reached, steps counted for all cooperatives, steps counted for its cooperative]; each hop that
reaches a new step returns the counter fields to add, and sessions.save adds them in the pipeline that
already writes the session (no extra round trip; nothing at all on hops that reach no new step).
"""

from __future__ import annotations

from channels.ussd.engine import State
from core.ops import FUNNEL_ALL, FUNNEL_STEPS, funnel_field

# Screens that stand for a funnel step; the amount and method screens belong to "what to pay", and
# the resume offer is a session's main menu.
STEP_OF = {"home": 0, "resume": 0, "pay_type": 1, "pay_amount": 1, "pay_method": 1, "pay_paid": 1,
           "pay_confirm": 2, "pay_done": 3}
# Keys of this session's own funnel bookkeeping: a resumed session keeps them, not the dropped one's.
OWN_KEYS = ("f", "fc")


def cooperative_of(state: State) -> str | None:
    """The cooperative the session is counted for: the one chosen, else the one known at the first hop."""
    return state.data.get("c") or state.data.get("fc")


def advance(state: State) -> list[str]:
    """Counter fields to add now that the session is on `state.screen`; updates the session's progress."""
    reached, counted_all, counted_coop = state.data.get("f") or (0, 0, 0)
    step = STEP_OF.get(state.screen)
    if step is not None:
        reached = max(reached, step + 1)
    fields = [funnel_field(FUNNEL_ALL, s) for s in FUNNEL_STEPS[counted_all:reached]]
    coop = cooperative_of(state)
    if coop:
        # A member of several cooperatives is counted for theirs once they choose it, from home on.
        fields += [funnel_field(coop, s) for s in FUNNEL_STEPS[counted_coop:reached]]
        counted_coop = reached
    if fields or reached:
        state.data["f"] = [reached, reached, counted_coop]
    return fields
