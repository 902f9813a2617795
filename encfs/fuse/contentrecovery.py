"""load(): taking over an existing backing file, and recovering it after a crash (content.py's
FileContent takes these from ContentRecovery): its state, the index of its journal, a torn tail
cut off; and plain_file_size, the plaintext size a backing file's length implies.

Of content.py's invariants, these are kept here:
- A journal found at load is made durable before recovery changes the backing file on its word;
  its torn tail is cut off (in memory only, if the content may not write).
- Journaled blocks that the state names as holes are dropped (written before the state that
  made them holes), and so are those past a block at or past the synced size that a crash lost
  (_drop_past_lost_tail). If the checkpoint after such a drop fails, the journal on disk still
  holds them: the file takes no writes, and stays loaded (holds_dropped).
- After a crash a torn last block past the synced size is cut off; a block below the synced
  size that fails is damage, left to read EIO.
- A backing file shorter than the synced size (or the size the kernel holds) reads EIO past
  its end, never zeros.
"""

from __future__ import annotations

import os

from encfs.blocks import OVERHEAD, BlockAuthError, plain_size, sealed_offset
from encfs.fuse.contentfields import ContentFields
from encfs.fuse.fileheader import HEADER_LEN, SPENT, read_state
from encfs.fuse.holes import Holes
from encfs.fuse.journal import HEAD_LEN, Run


def plain_file_size(backing_size: int, block: int) -> int:
    """Plaintext size implied by a backing file of ``backing_size`` bytes (0 if no header yet);
    a torn last block counts as one byte, so that reading it fails rather than vanishes."""
    if backing_size <= HEADER_LEN:
        return 0
    try:
        return plain_size(backing_size, HEADER_LEN, block)
    except ValueError:
        whole = backing_size - (backing_size - HEADER_LEN) % (block + OVERHEAD)
        return plain_size(whole, HEADER_LEN, block) + 1


class ContentRecovery(ContentFields):
    """load() and the crash recovery of content.FileContent (a mixin: the content's state)."""

    def load(self, writable: bool, known_size: int | None = None, after_crash: bool = False) -> list[str]:
        """Take over an existing backing file: its size, state and journal, recovering from a
        crash if one happened. Returns notes for the log. JournalDamaged if a durable journal
        record is bad. ``writable``: recovery may change the backing file and journal (else
        the journal is only read, and a torn tail is cut off in memory). ``known_size``: a
        size the kernel may hold for the file; a backing file found shorter than that was cut
        behind our back, and reads past its end fail rather than return zeros.
        ``after_crash``: the last mount did not end cleanly, so a torn last block may be a
        write that a crash cut short (after a clean unmount it can only be damage: EIO)."""
        notes: list[str] = []
        backing = os.fstat(self.fd).st_size
        state_opens = True
        dropped = 0  # journaled blocks left out of the index (recovery in memory until a checkpoint)
        if not self.v1:
            state = read_state(self.fd, self.cipher, self.state_file)
            state_opens = state is not None
            if state is None:
                notes.append("its state fails authentication: nothing counts as synced, and its "
                             "data key's budget as spent (its next write gives it a fresh key)")
            self.state = state or SPENT
            self.seals = self.state.seals
            self.holes = Holes(self.state.holes)
        if self.header.file_id in self._journals and self.journal.open_existing():
            runs, end, torn = self.journal.scan(self.cipher)
            notes += torn
            if writable:
                if torn and end >= HEAD_LEN:
                    self.journal.cut(end)
                # A crash may have left the journal (even its name) in the page cache only:
                # it must be durable before recovery changes the backing file on its word.
                self.journal.unsynced = self.journal.new = True
                self.journal.sync()
            self._index_runs(runs)
            for k in [k for k in self.index if k in self.holes]:
                del self.index[k]  # written before the state that made it a hole (see punch)
                dropped += 1
            if runs:
                notes.append(f"replaying {len(self.index)} journaled blocks after a crash")
            if after_crash and not self.v1 and state_opens and self.index:
                before = len(self.index)
                notes += self._drop_past_lost_tail(backing)
                dropped += before - len(self.index)
            backing = self._journal_end(backing, writable)
        floor = max(self.state.synced_size, self._index_end())
        self.size = plain_file_size(backing, self.block)
        if after_crash and not self.v1 and self.size > floor:
            notes += self._cut_torn_tail(backing, floor, writable)
        self.size = max(self.size, self._index_end())
        self.holes.clip(-(-self.size // self.block))
        expected = max(self.state.synced_size, known_size or 0)
        if self.size < expected:
            notes.append(f"backing file holds {self.size} of the file's {expected} bytes: "
                         f"it was cut; reads past its end fail")
            self.size = expected
        if self.journal.fd is not None:
            if writable:
                failed = self._try_checkpoint()
                notes += failed
                if dropped and failed:
                    # The journal on disk still holds the blocks dropped from the index: a write now
                    # could be undone by their replay after the next crash. Nothing is written to
                    # the file this session, and the next mount recovers it again.
                    self.read_only = self.holds_dropped = True
            else:
                self.read_only = True
        self.recovered_in_memory = self.read_only or \
            (not writable and self.size != plain_file_size(backing, self.block))
        return notes
    def _index_runs(self, runs: list[Run]) -> None:
        step = self.block + OVERHEAD
        for run in runs:
            for k in range(run.count):
                at = k * step
                self.index[run.first + k] = (run.offset + at, min(step, run.length - at))

    def _journal_end(self, backing: int, writable: bool) -> int:
        """If the newest version of the highest journaled block is short, the file ends there (a
        write that ended in it, or a truncate to inside it): blocks past it in the backing file
        are what an unfinished truncate left. Returns the backing length that remains."""
        if not self.index:
            return backing
        top = max(self.index)
        if self.index[top][1] == self.block + OVERHEAD:
            return backing
        cut = sealed_offset(top, HEADER_LEN, self.block)
        if backing > cut:
            if writable:
                os.ftruncate(self.fd, cut)
            return cut
        return backing

    def _drop_past_lost_tail(self, backing: int) -> list[str]:
        """Journaled blocks above a block at or past the synced size that the backing file
        lacks (whole or in part) and that is neither journaled nor a hole: an append written in
        place and never synced, whose tail a power loss lost while the journal, which a later
        write into the appended blocks grew, reached the disk. Nothing from that block on was
        acknowledged: drop those journaled blocks, so that the append is cut off as torn
        instead of leaving a gap that reads EIO. Below the synced size it is damage (EIO)."""
        whole = max(0, (backing - HEADER_LEN) // (self.block + OVERHEAD))
        for k in range(whole, max(self.index)):
            if k in self.index or k in self.holes:
                continue
            if k * self.block < self.state.synced_size:
                return []
            dropped = [j for j in self.index if j > k]
            for j in dropped:
                del self.index[j]
            return [(f"{len(dropped)} journaled blocks past block {k}, which a crash lost before "
                     f"any fsync, are cut off with it")]
        return []

    def _index_end(self) -> int:
        """The plaintext end of the highest journaled block (0 if none)."""
        if not self.index:
            return 0
        last = max(self.index)
        return last * self.block + self.index[last][1] - OVERHEAD

    def _cut_torn_tail(self, backing: int, floor: int, writable: bool) -> list[str]:
        """A last block past ``floor`` (never acknowledged by an fsync) that is shorter than a
        full block and fails authentication, while the block before it opens or is a hole, is
        what a crash tore from an append (a write cut short ends the file early): cut it off.
        Anything else that fails is damage, left to read EIO."""
        block, step = self.block, self.block + OVERHEAD
        last = (backing - HEADER_LEN - 1) // step
        at = sealed_offset(last, HEADER_LEN, block)
        if backing - at == step or last * block < floor or last in self.holes:
            return []
        try:
            self.cipher.open(last, os.pread(self.fd, backing - at, at))
            return []
        except BlockAuthError:
            pass
        # The key must be the file's own: the block before opens (its newest version), or is a
        # hole, named by a state that opened under this key (a hole never opens: it has no seal).
        if last and last - 1 not in self.holes:
            try:
                self.cipher.open(last - 1, self._sealed_block(last - 1, last * block))
            except BlockAuthError:
                return []
        if writable:
            os.ftruncate(self.fd, at)
            self.dirty = True
        self.size = last * block
        return [(f"its last block ({backing - at} bytes, past the synced size) was torn by a crash "
                 f"and is cut off: size now {self.size}")]
