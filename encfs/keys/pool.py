"""Data keys generated ahead of need, in batches (for callers that create many objects).

Creating a file needs a fresh data key bound to that file's context. Asking
the token for each one costs a round trip through the key service per file;
a pool asks for ``batch`` keys at once (KeyService.generate_data_keys) and
hands them out one by one.

Invariants:
- Every key is handed out at most once, together with the label its
  context was made for (the caller's object id): one key per object, as if
  generated on demand.
- A key is handed out only while its CMK is Enabled and still at the
  version it was generated under (checked on every take, against fresh
  metadata); otherwise the pool is emptied and refilled.
- A key waits at most ``max_age`` seconds; older ones are dropped unused.
- Keys never handed out are simply forgotten. The audit trail shows their
  GenerateDataKey records (each with its context), as for any data key
  generated and not used.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from encfs.keys.cache import DataKeyCache
from encfs.keys.context import EncryptionContext
from encfs.keys.service import DataKey, KeyService

Label = TypeVar("Label")


class DataKeyPool(Generic[Label]):
    """Fresh data keys under one CMK, each bound to the context of a label made in advance.

    Refills happen in the taker's thread, so errors (a disabled key, a missing
    token) reach the taker. (A background refill thread was measured and lost:
    its Python work competes for the GIL with the taker.)
    """

    def __init__(self, service: KeyService, key: str, new_label: Callable[[], tuple[Label, EncryptionContext]],
                 batch: int = 32, max_age: float = 60.0, cache: DataKeyCache | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self.service, self.key, self.batch, self.max_age = service, key, batch, max_age
        self._new_label = new_label
        self._cache = cache
        self._clock = clock
        self._keys: deque[tuple[float, Label, DataKey]] = deque()
        self._lock = threading.Lock()

    def take(self) -> tuple[Label, DataKey]:
        """A label and a data key (with plaintext) bound to the label's context."""
        with self._lock:
            self._drop_stale()
            if not self._keys:
                self._keys.extend(self._generate())
            _born, label, dk = self._keys.popleft()
            return label, dk

    def _drop_stale(self) -> None:
        """Empty the pool if its oldest key is too old or its CMK version may no longer be used."""
        if self._keys:
            born, _label, dk = self._keys[0]
            if self._clock() - born >= self.max_age or not self.service.data_key_usable(dk.key_id, dk.key_version):
                self._keys.clear()

    def _generate(self) -> list[tuple[float, Label, DataKey]]:
        labels = [self._new_label() for _ in range(self.batch)]
        # With the cache seeded, the object's first open needs no token call.
        keys = self.service.generate_data_keys(self.key, [context for _, context in labels], cache=self._cache,
                                              encfs_internal=True)
        born = self._clock()
        return [(born, label, dk) for (label, _context), dk in zip(labels, keys)]

    def clear(self) -> None:
        """Forget the pooled keys."""
        with self._lock:
            self._keys.clear()
