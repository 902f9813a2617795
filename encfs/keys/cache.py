"""Cache of unwrapped data keys, with AWS Encryption SDK-style limits.

An entry is keyed by (blob bytes, encoded context) and is served at most
``max_uses`` times and for at most ``max_age`` seconds after it was
unwrapped; then the next lookup unwraps again on the token. The key service
still checks the CMK's state on every hit, so disabling a key takes effect at
once even for cached data keys. Thread-safe.

``MAX_AGE`` (300 s) is the default lifetime, also of the filesystem's cache of
file data keys (it was one hour). An entry outlives what the token alone
knows: a key disabled on the token while keys.json was rolled back
(encfs.keys.tokenstate), or whose material was destroyed, keeps serving cached
entries until they expire. A miss costs one token decrypt and one audit record,
so five minutes costs nothing measurable (benchmarks/HISTORY.md, 5e93640).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Entry:
    plaintext: bytes
    key_id: str
    key_version: int
    born: float
    uses: int = 0


MAX_AGE = 300.0


class DataKeyCache:
    """LRU cache of unwrapped data keys bounded by age, uses and entry count."""

    def __init__(self, max_age: float = MAX_AGE, max_uses: int = 2**32, max_entries: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_age <= 0 or max_uses <= 0 or max_entries <= 0:
            raise ValueError("cache limits must be positive")
        self.max_age = max_age
        self.max_uses = max_uses
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[bytes, bytes], _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, blob: bytes, encoded_context: bytes) -> tuple[bytes, str, int] | None:
        key = (blob, encoded_context)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and (entry.uses >= self.max_uses
                                      or self._clock() - entry.born >= self.max_age):
                del self._entries[key]
                entry = None
            if entry is None:
                self.misses += 1
                return None
            entry.uses += 1
            self._entries.move_to_end(key)
            self.hits += 1
            return entry.plaintext, entry.key_id, entry.key_version

    def get_usable(self, blob: bytes, encoded_context: bytes,
                   usable: Callable[[str], bool]) -> tuple[bytes, str, int] | None:
        """get(), served only while ``usable(key_id)`` says the entry's CMK may still open it (the
        key service's check on every hit). Otherwise the key changed state: every entry goes,
        and None sends the caller down the audited path, which decides."""
        hit = self.get(blob, encoded_context)
        if hit is None or usable(hit[1]):
            return hit
        self.clear()
        return None

    def put(self, blob: bytes, encoded_context: bytes, plaintext: bytes, key_id: str, key_version: int) -> None:
        with self._lock:
            self._entries[(blob, encoded_context)] = _Entry(plaintext, key_id, key_version, self._clock(), 1)
            self._entries.move_to_end((blob, encoded_context))
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
