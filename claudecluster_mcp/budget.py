"""A plan's budget across its whole fleet of agents: ``max_cost_usd`` and ``max_tokens``.

The plan's total is what its tasks' agent runs have cost and used so far, as Claude Code
reports each run when it ends. Once the total reaches either limit, no new agent of the plan
starts, tasks not started are cancelled, and its running agents are stopped
(``budget_stop = "now"``) or finish (``"finish"``); work already merged stays. Per-run
limits remain Claude Code's own ``--max-budget-usd`` (``max_budget_usd``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .models import Plan

__all__ = ["Budget"]


@dataclass(frozen=True)
class Budget:
    """A plan's limits (None: no limit)."""

    max_cost_usd: float | None = None
    max_tokens: int | None = None

    @classmethod
    def of(cls, plan: Plan) -> Budget:
        """The budget stored with a plan."""
        return cls(plan.max_cost_usd, plan.max_tokens)

    @property
    def limited(self) -> bool:
        """True when there is a limit to check."""
        return self.max_cost_usd is not None or self.max_tokens is not None

    def reached(self, cost_usd: float, tokens: int) -> str | None:
        """Why the plan must stop ("budget reached: …" with the totals), or None while it is
        under both limits."""
        over = []
        if self.max_cost_usd is not None and cost_usd >= self.max_cost_usd:
            over.append(f"max_cost_usd ${self.max_cost_usd:g}")
        if self.max_tokens is not None and tokens >= self.max_tokens:
            over.append(f"max_tokens {self.max_tokens:,}")
        if not over:
            return None
        return (
            f"budget reached ({' and '.join(over)}): the plan's agents cost ${cost_usd:.4f} and used {tokens:,} tokens"
        )
