"""What ``encfs fsck`` finds and how it ends, for every kind of target it checks (volumes and
their snapshots now, in encfs/block/fsck.py; a filesystem checker reports the same way).

A check makes a Report: findings, each an *error* (damage: something reads as an I/O error, or
a redundant copy of something is gone or stale) or a *warning* (space that can be given back;
everything still reads right), each repairable or not; with ``--repair`` the checker marks the
ones it repaired. Exit codes are fsck(8)'s.

Invariants:
- exit_code(): 4 if an error is left unrepaired; else 1 if the repair changed anything (as
  e2fsck, which returns 1 whenever it modified the target); else 0 (warnings alone do not make
  a check fail). 8 (an operational error: missing target, wrong PIN, disabled key, attached
  volume) is never a Report: it is FsckError, one line.
- A finding's message names places (copies, slots, sector numbers, snapshot ids), never key
  material or plaintext.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from encfs.errors import EncfsError

EXIT_CLEAN, EXIT_CORRECTED, EXIT_UNCORRECTED, EXIT_OPERATIONAL = 0, 1, 4, 8
ERROR, WARNING = "error", "warning"


class FsckError(EncfsError):
    """fsck could not check the target (fsck(8)'s operational error)."""

    exit_code = EXIT_OPERATIONAL


@dataclass
class Finding:
    kind: str  # what is damaged: "header-copy", "commit-slot", "map-slot", "map-node", "sector", ...
    message: str
    severity: str = ERROR
    repairable: bool = False
    repaired: bool = False
    snapshot: str | None = None  # a snapshot's id; None: the live volume (or no place in one)
    sector: int | None = None  # the first damaged sector, for damage to sectors
    count: int = 0  # sectors from ``sector`` on
    place: str = ""  # what tells two findings of one kind apart (a copy, a slot): matches a re-check's
    path: str | None = None  # a filesystem's plaintext path, for damage to a file's blocks
    block: int | None = None  # the first damaged block of ``path`` (``count`` blocks from it on)

    @property
    def key(self) -> tuple[str, str | None, int | None, str]:
        return (self.kind, self.snapshot, self.sector, self.place)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "severity": self.severity, "message": self.message,
                               "repairable": self.repairable, "repaired": self.repaired}
        if self.snapshot is not None:
            out["snapshot"] = self.snapshot
        if self.sector is not None:
            out["sector"], out["count"] = self.sector, self.count
        if self.path is not None:
            out["path"] = self.path
        if self.block is not None:
            out["block"], out["count"] = self.block, self.count
        return out


@dataclass
class Report:
    target: str
    kind: str  # "volume", "export" or "filesystem"
    format: int | None = None
    findings: list[Finding] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    repair: bool = False
    seconds: float = 0.0

    def add(self, finding: Finding) -> None:
        self.findings.append(finding)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == WARNING]

    def exit_code(self) -> int:
        if any(not f.repaired for f in self.errors):
            return EXIT_UNCORRECTED
        return EXIT_CORRECTED if any(f.repaired for f in self.findings) else EXIT_CLEAN

    def as_json(self) -> dict[str, Any]:
        return {"target": self.target, "kind": self.kind, "format": self.format, "repair": self.repair,
                "counts": dict(self.counts, errors=len(self.errors), warnings=len(self.warnings),
                               repaired=sum(f.repaired for f in self.findings)),
                "seconds": round(self.seconds, 3), "damage": [f.as_json() for f in self.findings],
                "exit_code": self.exit_code()}


def sector_runs(sectors: list[int]) -> list[tuple[int, int]]:
    """Sorted sector numbers as (first, count) runs of consecutive ones."""
    runs: list[tuple[int, int]] = []
    for s in sorted(set(sectors)):
        if runs and runs[-1][0] + runs[-1][1] == s:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((s, 1))
    return runs


@contextmanager
def quiet(logger: str) -> Iterator[None]:
    """The stores and the filesystem core log what they find damaged (or repair) as they read;
    a checker reports it itself, once, as a finding."""
    log = logging.getLogger(logger)
    before = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(before)
