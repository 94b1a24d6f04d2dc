"""One health finding: what a detector saw, how bad it is, and where to look."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum


class Severity(IntEnum):
    """Ordered so that ``max(findings).severity`` is the worst and sorting is by badness."""

    INFO = 0
    WARNING = 1
    ERROR = 2
    FATAL = 3

    def __str__(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: str | int | Severity) -> Severity:
        """Accept 'warning', 'WARNING', 1 or Severity.WARNING (configs use lowercase)."""
        if isinstance(value, str):
            return cls[value.upper()]
        return cls(value)


@dataclass(frozen=True)
class Finding:
    """A detector's verdict; ``evidence`` holds the message's numbers."""

    detector: str
    severity: Severity
    message: str
    where: str
    evidence: Mapping[str, float] = field(default_factory=dict)
    run: str = ""

    def with_run(self, run: str) -> Finding:
        return dataclasses.replace(self, run=run)

    def to_dict(self) -> dict[str, object]:
        return {"detector": self.detector, "severity": str(self.severity),
                "message": self.message, "where": self.where,
                "evidence": dict(self.evidence), "run": self.run}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> Finding:
        """The inverse of ``to_dict`` (findings read back from diagnostics.json)."""
        return cls(detector=str(d["detector"]), severity=Severity.parse(str(d["severity"])),
                   message=str(d["message"]), where=str(d["where"]),
                   evidence=dict(d.get("evidence") or {}), run=str(d.get("run", "")))

    def __str__(self) -> str:
        run = f" [{self.run}]" if self.run else ""
        return f"{self.severity}: {self.detector}{run}: {self.message} (look at {self.where})"


def worst_first(findings: list[Finding]) -> list[Finding]:
    """Sort by severity, worst first; ties keep detector order (stable sort)."""
    return sorted(findings, key=lambda f: -int(f.severity))
