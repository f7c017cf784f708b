"""The budget ledger as the tests read it: the real one in Redis, after the fact."""

from __future__ import annotations

from worker import connections
from worker.settings import Settings
from worker.state.ledger import BudgetLedger, ScopeState


async def day_state(settings: Settings) -> ScopeState:
    """Today's whole-day budget scope (spend, live reservations, calls) from the real ledger."""
    client = connections.redis(settings)  # by URL or through Sentinel
    try:
        ledger = BudgetLedger(client, settings.redis.key_prefix, settings.llm.budget, reservation_ttl_s=60)
        return await ledger.state(ledger.day_scope(ledger.today()))
    finally:
        await client.aclose()
