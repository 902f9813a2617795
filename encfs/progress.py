"""Progress bars for long operations (snapshot export and import, ...), drawn by tqdm.

``with progress(total, "export snap-...") as bar: bar.update(n)`` shows a bar with the rate and
the time left on stderr, but only when stderr is a terminal: scripts, pipes, logs and daemons
get nothing. ``ENCFS_PROGRESS=1`` forces the bar on (also on a pipe), ``ENCFS_PROGRESS=0`` forces
it off; any other value leaves the choice to the terminal test.

Invariants:
- Nothing is written anywhere unless the bar is shown; a bar is drawn on stderr only (stdout
  stays the command's output, e.g. ``--json``).
- The bar is closed and its line cleared when the block ends, also when it ends with an
  exception, so an error line (``encfs: ...``) starts on a clean line.
- A bar shows counts and names given by the caller, nothing else (callers pass no secrets).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

ENV = "ENCFS_PROGRESS"


class Progress(Protocol):
    def update(self, n: int) -> object: ...


class _Silent:
    """The bar of a run that shows none."""

    def update(self, n: int) -> None:
        pass


def enabled() -> bool:
    """Whether a bar would be shown now: ENCFS_PROGRESS if it says 0 or 1, else whether stderr is a tty."""
    forced = os.environ.get(ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # no stderr, or a closed one
        return False


def _columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError, AttributeError):  # not a terminal (ENCFS_PROGRESS=1 on a pipe)
        return 0


@contextmanager
def progress(total: int, desc: str, unit: str = "B") -> Iterator[Progress]:
    """A bar counting to ``total`` units (bytes by default, shown scaled: kB, MB, GB and MB/s)."""
    if not enabled():
        yield _Silent()
        return
    from tqdm import tqdm  # loaded only for a bar: quiet runs (and daemons) do without it

    # A terminal may report a size of 0 x 0 (a pty nobody sized), where tqdm would draw nothing.
    sized = _columns() > 0
    bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", file=sys.stderr, leave=False,
               dynamic_ncols=sized, ncols=None if sized else 80, nrows=None if sized else 24)
    try:
        yield bar
    finally:
        bar.close()  # leave=False: the line is cleared
