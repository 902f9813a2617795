"""What content.FileContent's mixins (contentread.py, contentwrite.py, contentrecovery.py) use of
the content and of one another, declared once for the type checker: the fields FileContent sets
in __init__ and the methods the others define. Nothing here exists at run time."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from encfs.blocks import BlockCipher
    from encfs.fuse.fileheader import FileHeader, FileState
    from encfs.fuse.holes import Holes
    from encfs.fuse.journal import Journal
    from encfs.sealing import Sealer


class ContentFields:
    """The base of FileContent's mixins (see the module docstring)."""

    if TYPE_CHECKING:  # defined by FileContent.__init__
        fd: int
        header: FileHeader
        block: int
        v1: bool
        journal: Journal
        _journals: set[bytes]
        index: dict[int, tuple[int, int]]
        size: int
        state: FileState
        holes: Holes
        sparse: bool
        seals: int
        verified: bool
        read_only: bool
        recovered_in_memory: bool
        holds_dropped: bool
        dirty: bool
        sync_failed: str | None
        sealer: Sealer
        _on_auth_error: Callable[[int], None] | None
        _bounding: bool

        # defined by FileContent
        @property
        def cipher(self) -> BlockCipher: ...
        @property
        def state_file(self) -> bytes | None: ...
        def checkpoint(self) -> None: ...
        def _try_checkpoint(self) -> list[str]: ...
        def count_seals(self, n: int) -> None: ...
        def sync_backing(self, datasync: bool = True) -> None: ...
        def check_durable(self) -> None: ...
        def stop_changes(self, why: str) -> None: ...
        def _write_state(self, synced_size: int, holes: Holes | None = None) -> None: ...
        def write_pending_state(self) -> None: ...

        # defined by ContentReads
        def read(self, offset: int, length: int) -> bytes | bytearray | memoryview: ...
        def _sealed_block(self, k: int, size: int) -> bytes: ...
