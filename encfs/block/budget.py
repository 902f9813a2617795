"""The volume key's seal count: every seal under it is counted (docs/FORMAT.md §7.5, §7.6).

Format 1 seals with random 96-bit nonces, so NIST SP 800-38D §8.3 caps its
volume key at 2^32 seals. Format 2 (``counter``) takes each seal's nonce from
the count itself: seal number n uses counter n, so no value is handed out
twice, and what bounds the key is the data under it (COUNTER_WARN). The count
is persisted as a reservation in the header (``seals_reserved``), not at
every flush (that would cost two header fsyncs per flush). Invariants:

- No seal is made unless ``used + n <= reserved`` and ``reserved`` is what
  both header copies hold (a reservation is written, copy 0 + fsync, copy 1
  + fsync, before the seal it allows). An open starts from used = reserved,
  so a crash can only over-count: the budget of a seal is never reused.
- Sector seals stop at the format's refusal (SEAL_REFUSE, COUNTER_REFUSE),
  map and commit seals 2^24 later: a flush after the refusal can still commit
  what was written before it. A refusal is OSError(ENOSPC) with one log line.
- An open starting from the reservation is what makes format 2's counter
  skip, never repeat, the values a crashed session may have used.
- A clean close settles the reservation down to the count (one header
  write), so only a crash loses the unused part of a reservation.

The thresholds are read at call time, so tests can lower them.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable

log = logging.getLogger("encfs.block")

SEAL_MAX = 1 << 32  # NIST SP 800-38D §8.3: random 96-bit nonces, at most 2^32 invocations per key
SEAL_REFUSE = SEAL_MAX - (1 << 24)  # sector writes stop here; map seals (flushes) may use the rest
SEAL_WARN = 1 << 30  # one warning when the count passes this, and in `encfs volume info`
# Seals allowed per header write. Each sector seal is 4 KiB written, so a reservation covers 4 GiB:
# even at 1.2 GB/s one header update per 3.5 s, under 0.2% (benchmarks/HISTORY.md, 1835929);
# a crash wastes at most 2^20 seals, 1/4096 of the budget.
RESERVE_STEP = 1 << 20
# Format 2 (cow.py) draws each nonce from this count, so it is a 64-bit counter, not a random-nonce
# budget: its values never repeat by construction. What bounds the key is then the data under it:
# each seal is 256 AES blocks, and the GCM bound (the birthday bound of AES as a PRF) after 2^40
# seals (4 PiB) is 2^-33; encfs warns there and refuses at 2^48 (1 EiB), unreachable in practice.
COUNTER_WARN = 1 << 40
COUNTER_REFUSE = 1 << 48


class SealBudget:
    """Counts the seals under one volume key; thread-safe (a server seals in several threads)."""

    def __init__(self, used: int, persist: Callable[[int], None], name: str, counter: bool = False) -> None:
        self.used = self.reserved = used
        self.counter = counter  # format 2: the count is the nonce counter (see COUNTER_WARN)
        self._persist = persist  # writes a header whose seals_reserved is the argument; raises OSError
        self._name = name
        self._lock = threading.Lock()
        self._warned = False
        self._refused = False
        self._warn_if_past()

    def limits(self) -> tuple[int, int, int]:
        """(warn, refuse sector seals, refuse every seal), read at call time."""
        if self.counter:
            return COUNTER_WARN, COUNTER_REFUSE, COUNTER_REFUSE + (1 << 24)
        return SEAL_WARN, SEAL_REFUSE, SEAL_MAX

    def _bound(self) -> str:
        return ("the data one key should seal (GCM's bound, docs/FORMAT.md section 8)" if self.counter else
                "2^32 random-nonce seals (NIST SP 800-38D)")

    def _warn_if_past(self) -> None:
        warn, refuse, _last = self.limits()
        if not self._warned and self.used >= warn:
            self._warned = True
            log.warning("%s: the volume key has made %d seals, past %d of %s; writes stop at %d: detach it and "
                        "run `encfs volume rekey` before then", self._name, self.used, warn, self._bound(), refuse)

    def spend(self, n: int, sectors: bool = True) -> int:
        """Account for ``n`` seals about to be made (sector seals unless ``sectors`` is false) and
        return the count before them: a counter-nonce format seals them with counters
        [returned, returned + n), each handed out once. OSError(ENOSPC) if the budget cannot take
        them, OSError from the header write if a new reservation cannot be persisted. Either way
        nothing may be sealed."""
        with self._lock:
            _warn, refuse, last = self.limits()
            limit = refuse if sectors else last
            if self.used + n > limit:
                if not self._refused:
                    self._refused = True
                    log.error("%s: writes refused: the volume key has made %d seals, the most it may make "
                              "(%s); detach it and run `encfs volume rekey`", self._name, self.used, self._bound())
                raise OSError(errno.ENOSPC, "the volume key's seal budget is spent")
            if self.used + n > self.reserved:
                new = min(max(self.reserved + RESERVE_STEP, self.used + n), last)
                self._persist(new)
                self.reserved = new
            first = self.used
            self.used += n
            self._warn_if_past()
            return first

    def settle(self) -> None:
        """Persist the exact count (a clean close): the unused reservation is given back."""
        with self._lock:
            if self.reserved != self.used:
                self._persist(self.used)
                self.reserved = self.used
