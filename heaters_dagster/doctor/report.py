"""What ``heaters doctor`` found and did: :class:`Finding`, :class:`Report` (no Dagster imports)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

CHECKS = ("expired_claim", "orphan_file", "missing_file", "temp_file", "stale_scratch", "stale_pg_holder")


@dataclass
class Finding:
    check: str  # one of CHECKS
    subject: str  # what it is about: "clip 42", a store path, a folder, "pid 1234"
    message: str
    fixable: bool
    fix: str  # what repair does, or why it does nothing
    data: dict[str, Any] = field(default_factory=dict)
    fixed: bool = False
    outcome: str | None = None  # what repair did (or why it did not)

    def line(self) -> str:
        state = ""
        if self.outcome is not None:
            state = f"  [{'fixed' if self.fixed else 'not fixed'}: {self.outcome}]"
        elif not self.fixable:
            state = f"  [report only: {self.fix}]"
        return f"{self.check:<16} {self.subject}: {self.message}{state}"


@dataclass
class Report:
    checked_at: datetime
    store: str
    findings: list[Finding] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # checks that could not run, and why
    repaired: bool = False

    @property
    def healthy(self) -> bool:
        return not self.findings

    @property
    def unresolved(self) -> list[Finding]:
        return [f for f in self.findings if not f.fixed]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.findings:
            out[f.check] = out.get(f.check, 0) + 1
        return out

    def by_check(self, check: str) -> list[Finding]:
        return [f for f in self.findings if f.check == check]

    def summary(self) -> str:
        if self.healthy:
            skipped = f" ({len(self.skipped)} checks skipped)" if self.skipped else ""
            return "healthy: nothing to fix" + skipped
        parts = ", ".join(f"{n} {c.replace('_', ' ')}" for c, n in sorted(self.counts().items()))
        if self.repaired:
            left = len(self.unresolved)
            return f"{len(self.findings)} problems ({parts}): {len(self.findings) - left} fixed, {left} left"
        fixable = sum(1 for f in self.findings if f.fixable)
        return f"{len(self.findings)} problems ({parts}); {fixable} fixable with --fix"

    def to_dict(self) -> dict[str, Any]:
        return {
            "checked_at": self.checked_at.isoformat(), "store": self.store, "healthy": self.healthy,
            "repaired": self.repaired, "unresolved": len(self.unresolved), "counts": self.counts(),
            "skipped": list(self.skipped), "summary": self.summary(),
            "findings": [asdict(f) for f in self.findings],
        }


def _epoch(now: datetime | float | None) -> float:
    if now is None:
        return time.time()
    if isinstance(now, datetime):
        return (now if now.tzinfo else now.replace(tzinfo=timezone.utc)).timestamp()
    return float(now)
