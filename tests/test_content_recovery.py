"""FileContent's crash recovery without a mount: the states a crash can leave (docs/FORMAT.md §6.5),
made by stopping a content where the daemon's process would have died."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from content_files import FILE_ID, BackingFile

from encfs.blocks import BlockAuthError
from encfs.fuse import contentwrite, sparse
from encfs.fuse.content import FileContent, in_place_runs
from encfs.fuse.fileheader import V1, V2, FileHeader
from encfs.fuse.journal import Journal, JournalDamaged, journal_path

B = 4096
STEP = B + 28


class Files(BackingFile):
    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, B)

    def load(self, after_crash: bool = True, writable: bool = True) -> tuple[FileContent, list[str]]:
        return self.open(after_crash=after_crash, writable=writable)

    def journal(self) -> Path:
        return Path(os.fsdecode(journal_path(self.root, FILE_ID)))


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


def crash(c: FileContent) -> None:
    """The process dies: nothing is checkpointed (the page cache keeps what was written)."""
    c.release_fds()


def test_an_overwrite_is_journaled_and_replayed_after_a_crash(files: Files) -> None:
    c = files.create()
    old = os.urandom(3 * B)
    c.write(0, old)
    c.fsync(False)
    c.write(100, b"new" * 1000)  # blocks 0 and 1 exist: into the journal, not in place
    assert os.pread(c.fd, STEP, 128) == os.pread(c.fd, STEP, 128)  # nothing in place changed...
    assert c.index and files.journal().exists()
    before = bytearray(old)
    before[100:3100] = b"new" * 1000
    assert c.read(0, 3 * B) == before
    crash(c)
    c, notes = files.load()
    assert any("replaying" in n for n in notes)
    assert c.read(0, 3 * B) == before and not files.journal().exists()
    crash(c)
    c, notes = files.load()  # replaying again changes nothing
    assert c.read(0, 3 * B) == before and notes == []


def test_a_torn_journal_tail_is_dropped_and_old_blocks_stay(files: Files) -> None:
    c = files.create()
    old = os.urandom(2 * B)
    c.write(0, old)
    c.fsync(False)
    c.write(0, os.urandom(B))  # journaled, not synced
    end = c.journal.length
    crash(c)
    with open(files.journal(), "r+b") as f:
        f.truncate(end - 100)  # the append the crash cut short
    c, notes = files.load()
    assert any("torn by a crash" in n for n in notes)
    assert c.read(0, 2 * B) == old


def test_a_record_torn_inside_the_zeros_written_ahead_is_dropped(files: Files) -> None:
    c = files.create()
    old = os.urandom(2 * B)
    c.write(0, old)
    c.fsync(False)
    c.write(0, os.urandom(B))
    c.fsync(False)
    c.write(B, os.urandom(B))  # journaled, not synced: its end never reached the disk
    end, size = c.journal.length, c.journal.size
    assert size > end + 24 and size % 4096 == 0, "the journal is written ahead with zeros"
    crash(c)
    raw = bytearray(files.journal().read_bytes())
    assert len(raw) == size and not any(raw[end:])
    raw[end - 100:end] = bytes(100)
    files.journal().write_bytes(raw)
    c, notes = files.load()
    assert any("torn by a crash" in n for n in notes)
    assert c.read(0, B) != old[:B] and c.read(B, B) == old[B:]


def test_the_zeros_written_ahead_end_the_records_and_the_next_one_follows(files: Files) -> None:
    c = files.create()
    c.write(0, os.urandom(3 * B))
    c.fsync(False)
    new = os.urandom(B)
    c.write(0, new)
    grown = os.path.getsize(files.journal())
    c.fsync(False)  # its sync record goes into the zeros: the fdatasync after the next record
    end = c.journal.length  # commits no new size
    assert os.path.getsize(files.journal()) == grown == c.journal.size > end
    crash(c)
    c, notes = files.load(writable=False)
    assert not any("torn" in n for n in notes) and c.journal.length == end  # zeros: nothing torn
    assert c.read(0, B) == new
    c.release_fds()
    c, notes = files.load()  # replayed and checkpointed
    assert c.read(0, B) == new and not files.journal().exists()
    later = os.urandom(B)
    c.write(B, later)  # a new journal; records follow each other, whatever was written ahead
    c.write(2 * B, later)
    c.fsync(False)
    c.write(0, later)
    crash(c)
    c, notes = files.load()
    assert notes and not any("torn" in n for n in notes)
    assert c.read(0, 3 * B) == later * 3


def test_a_zero_record_header_before_a_sync_record_is_damage(files: Files) -> None:
    c = files.create()
    c.write(0, os.urandom(2 * B))
    c.fsync(False)
    c.write(0, os.urandom(B))
    c.fsync(False)
    crash(c)
    raw = bytearray(files.journal().read_bytes())
    raw[32:32 + 24] = bytes(24)  # not zeros written ahead: a sync record follows
    files.journal().write_bytes(raw)
    with pytest.raises(JournalDamaged):
        files.load()


def test_a_damaged_record_before_a_sync_record_is_damage(files: Files) -> None:
    c = files.create()
    c.write(0, os.urandom(2 * B))
    c.fsync(False)
    c.write(0, os.urandom(B))
    c.fsync(False)  # the record is durable: a sync record follows it
    crash(c)
    raw = bytearray(files.journal().read_bytes())
    raw[32 + 24 + 50] ^= 1
    files.journal().write_bytes(raw)
    with pytest.raises(JournalDamaged):
        files.load()
    assert files.journal().exists(), "a damaged journal must be kept"


def test_an_interrupted_truncate_ends_the_file_at_the_journaled_short_block(files: Files) -> None:
    c = files.create()
    data = os.urandom(3 * B)
    c.write(0, data)
    c.fsync(False)
    # truncate's first steps: the synced size goes down, the new short last block is journaled
    # and synced...
    c._write_state(B)
    c._place(1, c.cipher.seal(1, data[B:B + 10]), c.size)
    c.journal.sync()
    crash(c)  # ...and the crash comes before the backing file is cut
    c, _notes = files.load()
    assert c.size == B + 10 and c.read(0, 3 * B) == data[:B + 10]


def test_a_torn_append_is_cut_off_after_a_crash(files: Files) -> None:
    c = files.create()
    c.write(0, os.urandom(2 * B))
    c.fsync(False)  # synced size: 2 blocks
    c.write(2 * B, os.urandom(3 * B))  # past the end: in place
    crash(c)
    os.truncate(files.path, 128 + 4 * STEP + 1000)  # the last write was cut short
    c, notes = files.load()
    assert c.size == 4 * B and any("torn by a crash" in n for n in notes)
    assert len(c.read(0, 10 * B)) == 4 * B
    assert os.path.getsize(files.path) == 128 + 4 * STEP


def test_a_torn_append_after_an_unaligned_end_is_cut_off(files: Files) -> None:
    """The block before the torn one was a short last block, extended through the journal: its
    newest version is there, and only there (in place: the old short block, then a hole)."""
    c = files.create()
    first = os.urandom(B + 1000)
    c.write(0, first)
    c.fsync(False)
    more = os.urandom(2 * B)
    c.write(B + 1000, more[:B - 1000])  # block 1 grows (journaled)
    c.journal.sync()  # (an fsync's): with unsynced records in the journal, appends would join it
    c.write(2 * B, more[B - 1000:])  # blocks 2-3 go in place
    assert 1 in c.index and 2 not in c.index
    crash(c)
    os.truncate(files.path, 128 + 2 * STEP + 100)  # the write was cut short inside block 2
    c, notes = files.load()
    assert any("torn by a crash" in n for n in notes), notes
    assert c.size == 2 * B and c.read(0, 3 * B) == (first + more)[:2 * B]


def test_appends_join_an_unsynced_journal_and_come_back_after_a_crash(files: Files) -> None:
    """An overwrite, then an append, then fsync (SQLite's transaction): the appended blocks go
    to the journal with the overwrite, the fsync syncs the journal alone, and after a crash the
    journal brings them back past the backing file's end."""
    c = files.create()
    base = os.urandom(2 * B)
    c.write(0, base)
    c.fsync(False)
    new0 = os.urandom(100)
    c.write(0, new0)  # an overwrite: journaled, not yet synced
    tail = os.urandom(B + 500)
    c.write(2 * B, tail)  # past the end: joins the journal
    assert {0, 2, 3} <= set(c.index) and not c.dirty
    c.fsync(True)
    crash(c)
    assert os.path.getsize(files.path) == 128 + 2 * STEP  # nothing of the append in place
    c, _notes = files.load()
    assert c.size == 3 * B + 500
    assert c.read(0, 5 * B) == new0 + base[100:] + tail


def test_appends_stay_in_place_after_unsynced_ones_and_a_power_loss_cuts_them(files: Files) -> None:
    """Blocks appended in place and not synced, then an overwrite (journaled), then more
    appended: these go in place too. A power loss may write the journal back and lose the
    backing file's unsynced tail; journaled blocks past that tail would leave a gap reading EIO."""
    c = files.create()
    base = os.urandom(2 * B)
    c.write(0, base)
    c.fsync(False)
    c.write(2 * B, os.urandom(2 * B))  # in place, not synced
    new0 = os.urandom(100)
    c.write(0, new0)  # journaled, not synced
    c.write(4 * B, os.urandom(B))  # past the end: in place, after the unsynced blocks
    assert 4 not in c.index and 0 in c.index
    c.journal.sync()  # the journal reached the disk...
    crash(c)
    os.truncate(files.path, 128 + 2 * STEP)  # ...the backing file's unsynced tail did not
    c, _notes = files.load()
    assert c.size == 2 * B
    assert c.read(0, 6 * B) == new0 + base[100:]


def test_journaled_blocks_past_a_lost_unsynced_tail_are_cut_with_it(files: Files) -> None:
    """Blocks 2-3 written in place and not synced, then block 3 (which exists) grown through the
    journal. A power loss that writes the journal back but loses the backing file's tail leaves
    journaled block 3 past missing block 2: neither was acknowledged, so both are cut as a torn
    append instead of block 2 reading EIO."""
    c = files.create()
    base = os.urandom(2 * B)
    c.write(0, base)
    c.fsync(False)
    c.write(2 * B, os.urandom(B + B // 2))  # blocks 2-3 in place, not synced
    c.write(3 * B + B // 2, os.urandom(B // 4))  # block 3 exists: journaled
    assert 3 in c.index and 2 not in c.index
    c.journal.sync()
    crash(c)
    backing, journal = files.path.read_bytes(), files.journal().read_bytes()
    for tail in (2 * STEP, 2 * STEP + 100):  # block 2 lost, or cut short
        files.path.write_bytes(backing[:128 + tail])
        files.journal().write_bytes(journal)
        files.journals.add(FILE_ID)  # as a new mount lists it
        c, notes = files.load()
        assert any("cut off with it" in n for n in notes), notes
        assert c.size == 2 * B, notes
        assert c.read(0, 6 * B) == base
        assert os.path.getsize(files.path) == 128 + 2 * STEP and not files.journal().exists()
        crash(c)


def _lost_tail(files: Files) -> bytes:
    """The state the test above starts from: blocks 2-3 in place and never synced, block 3 grown
    through the journal, the journal durable, and a power loss that lost block 2 from the backing
    file. Returns the synced first two blocks."""
    c = files.create()
    base = os.urandom(2 * B)
    c.write(0, base)
    c.fsync(False)
    c.write(2 * B, os.urandom(B + B // 2))
    c.write(3 * B + B // 2, os.urandom(B // 4))
    c.journal.sync()
    crash(c)
    os.truncate(files.path, 128 + 2 * STEP)
    return base


def test_blocks_dropped_from_a_journal_that_stays_keep_the_file_from_writes(
        files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the checkpoint after the drop fails (a full disk), the journal on disk still holds the
    dropped blocks: a write now could be undone by their replay after the next crash. The file
    takes no writes this session and counts as recovered in memory only (the next mount again)."""
    base = _lost_tail(files)

    def full(self: FileContent) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(FileContent, "checkpoint", full)
    c, notes = files.load()
    assert any("checkpoint failed" in n for n in notes), notes
    assert c.read(0, 6 * B) == base and c.read_only and c.recovered_in_memory
    assert files.journal().exists()


def test_no_journaled_block_is_dropped_when_the_state_fails_authentication(files: Files) -> None:
    """A state that does not open says nothing about what was synced: a gap below journaled
    blocks is then damage (EIO), never cut."""
    _lost_tail(files)
    os.setxattr(files.path, "user.encfs.state", b"x" * 60)
    c, _notes = files.load()
    assert c.size == 3 * B + B // 2 + B // 4
    with pytest.raises(BlockAuthError):
        c.read(2 * B, B)


def test_a_lost_block_below_the_synced_size_is_damage_even_with_a_journal(files: Files) -> None:
    c = files.create()
    c.write(0, os.urandom(3 * B + B // 2))
    c.fsync(False)
    c.write(3 * B + B // 2, os.urandom(B // 4))  # block 3 exists: journaled
    c.journal.sync()
    crash(c)
    os.truncate(files.path, 128 + 2 * STEP)  # a synced block is gone: damage, not a torn append
    c, notes = files.load()
    assert c.size == 3 * B + B // 2 + B // 4
    with pytest.raises(BlockAuthError):
        c.read(2 * B, B)


def test_a_checkpoint_reads_the_pages_it_writes_into_ahead_all_at_once(files: Files,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A sealed block shares pages with its neighbours, so writing it in place reads them first:
    the checkpoint asks for all of them up front (merged where blocks touch), not one by one."""
    c = files.create()
    c.write(0, os.urandom(10 * B))
    c.fsync(False)
    for k in (1, 2, 3, 7):
        c.write(k * B, os.urandom(B))  # journaled
    asked: list[tuple[int, int]] = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: (
        asked.append((offset, length)) if advice == os.POSIX_FADV_WILLNEED else None, real(fd, offset, length, advice))[1])
    c.checkpoint()
    assert asked == [(128 + 1 * STEP, 3 * STEP), (128 + 7 * STEP, STEP)]


def test_a_checkpoint_copies_a_journaled_run_as_one_piece() -> None:
    """Blocks written together lie end to end in the journal and in place: one read, one write.
    A record header (another run) or a short block ends a piece."""
    index = {1: (24, STEP), 2: (24 + STEP, STEP), 3: (24 + 2 * STEP, 100),  # one run, short last block
             4: (3 * STEP + 48, STEP),  # the next run: after a record header
             6: (4 * STEP + 48, STEP),  # not the block after 4
             7: (5 * STEP + 72, STEP)}  # the block after 6, but another run: a record header between
    assert in_place_runs(index, STEP) == [(1, 24, 2 * STEP + 100), (4, 3 * STEP + 48, STEP),
                                          (6, 4 * STEP + 48, STEP), (7, 5 * STEP + 72, STEP)]
    index[7] = (5 * STEP + 48, STEP)  # end to end with 6 (one run): one piece
    assert in_place_runs(index, STEP)[-1] == (6, 4 * STEP + 48, 2 * STEP)


def test_a_checkpoint_of_overwritten_runs_puts_every_block_in_place(files: Files) -> None:
    c = files.create()
    old = os.urandom(20 * B)
    c.write(0, old)
    c.fsync(False)
    new = bytearray(old)
    for at, length in ((B, 5 * B), (9 * B + 7, 3 * B), (2 * B, B), (15 * B, 5 * B - 10)):
        data = os.urandom(length)
        c.write(at, data)
        new[at:at + length] = data
    assert c.index
    c.checkpoint()
    assert not c.index and c.read(0, 20 * B) == new
    crash(c)
    c, _notes = files.load(after_crash=False)
    assert c.read(0, 20 * B) == new


def test_a_checkpoint_whose_journal_removal_fails_still_reads_its_blocks(
        files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    """The directory sync after the journal's unlink fails: the checkpoint reports it, and the
    blocks it put in place read back from there (the journal's fd is closed by then)."""
    import encfs.fuse.journal as journal_module
    c = files.create()
    c.write(0, os.urandom(3 * B))
    c.fsync(False)
    new = os.urandom(B)
    c.write(B, new)  # journaled
    assert 1 in c.index
    c.journal.sync()  # (its name durable: the failing sync below is the removal's)

    def failing(path: object) -> None:
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(journal_module, "fsync_dir", failing)
    with pytest.raises(OSError):
        c.checkpoint()
    assert c.read(B, B) == new


def test_a_torn_looking_block_is_damage_after_a_clean_unmount(files: Files) -> None:
    c = files.create()
    c.write(0, os.urandom(3 * B))
    c.close()
    os.truncate(files.path, 128 + 2 * STEP + 1000)
    c, notes = files.load(after_crash=False)
    assert notes == []
    with pytest.raises(BlockAuthError):
        c.read(0, 3 * B)


def test_a_block_below_the_synced_size_is_never_cut(files: Files) -> None:
    c = files.create()
    c.write(0, os.urandom(3 * B))
    c.fsync(False)
    crash(c)
    os.truncate(files.path, 128 + 2 * STEP + 1000)
    c, notes = files.load()
    assert c.size == 3 * B and any("was cut" in n for n in notes)
    with pytest.raises(BlockAuthError):
        c.read(2 * B, B)


def test_a_last_block_under_another_key_is_not_taken_for_a_torn_append(files: Files) -> None:
    c = files.create()
    c.write(0, os.urandom(2 * B + 1000))
    crash(c)
    raw = bytearray(files.path.read_bytes())
    raw[128 + 2 * STEP - 1] ^= 1  # the block before the short last one fails too: not a torn append
    raw[-1] ^= 1
    files.path.write_bytes(raw)
    c, notes = files.load()
    assert c.size == 2 * B + 1000 and notes == []


def test_a_version_1_file_journals_every_write_and_upgrades(files: Files) -> None:
    c = files.create(V1)
    c.write(0, os.urandom(B + 10))
    assert os.path.getsize(files.path) == 128 and c.index  # even the first write is journaled
    c.close()
    c, _ = files.load()
    assert c.v1 and c.upgrade() and not c.v1
    assert FileHeader.parse(os.pread(c.fd, 128, 0)).version == V2
    c.write(c.size, os.urandom(B))
    c.close()


def test_a_full_disk_leaves_no_partial_record(files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    c = files.create()
    old = os.urandom(2 * B)
    c.write(0, old)
    c.fsync(False)
    real = os.pwritev

    calls = []

    def full(fd: int, buffers: list, offset: int) -> int:
        if fd != c.journal.fd:
            return real(fd, buffers, offset)
        calls.append(offset)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real(fd, [bytes(memoryview(buffers[0])[:10])], offset)  # a short write first

    c.write(B, os.urandom(B))  # creates the journal
    length = c.journal.length
    monkeypatch.setattr(os, "pwritev", full)
    with pytest.raises(OSError):
        c.write(0, os.urandom(100))
    monkeypatch.undo()
    assert c.journal.length == length == os.path.getsize(files.journal())


def test_a_disk_too_full_for_the_zeros_ahead_takes_the_record_alone(files: Files,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    c = files.create()
    c.write(0, os.urandom(2 * B))
    c.fsync(False)
    real = os.pwritev
    refused = []

    def no_room_ahead(fd: int, buffers: list, offset: int) -> int:
        if fd == c.journal.fd and offset + sum(len(b) for b in buffers) > c.journal.length + STEP + 48:
            refused.append(offset)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", no_room_ahead)
    new = os.urandom(B)
    c.write(0, new)  # the record fits; the zeros after it do not
    c.fsync(False)
    monkeypatch.undo()
    assert refused and c.journal.size == c.journal.length == os.path.getsize(files.journal())
    crash(c)
    c, notes = files.load()
    assert not any("torn" in n for n in notes) and c.read(0, B) == new


def test_a_failed_write_that_made_the_journal_leaves_its_header(files: Files,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    c = files.create()
    first = os.urandom(2 * B - 100)
    c.write(0, first)  # not synced: the next write past the end goes in place too
    real = contentwrite.pwrite_all

    def full(fd: int, data: bytes, offset: int) -> None:
        if fd == c.fd:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, offset)

    monkeypatch.setattr(contentwrite, "pwrite_all", full)
    with pytest.raises(OSError):
        c.write(B, os.urandom(2 * B))  # block 1 to a new journal, block 2 in place: fails
    monkeypatch.undo()
    assert files.journal().read_bytes()[:4] == b"ENCJ"
    new = os.urandom(100)
    c.write(0, new)
    c.fsync(False)
    crash(c)
    c, notes = files.load()
    assert c.read(0, 2 * B) == new + first[100:]


def test_an_append_leaves_room_for_its_sync_record(tmp_path: Path) -> None:
    journal = Journal(os.fsencode(tmp_path), FILE_ID)
    journal.append(0, 1, bytes(STEP))
    size = journal.size
    journal.append(1, 1, bytes(size - journal.length - 24 - 10))  # ends 10 bytes before the zeros do
    grown = journal.size
    journal.sync()  # the fdatasync wrote data only; the sync record must not grow the file after it
    assert journal.size == grown == os.fstat(journal.fd).st_size > journal.length
    journal.remove()


def test_a_journal_whose_unlink_fails_stays_until_a_checkpoint_removes_it(
        files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint's unlink of the journal fails: the journal stays open and indexed (its
    records are in place too), so later overwrites still journal and a block written in place
    is never undone by a replay of the stale record at the next load."""
    for after_crash in (True, False):
        c = files.create()
        c.write(0, os.urandom(2 * B))
        c.fsync(False)
        c.write(B, os.urandom(B))  # journaled

        def failing(path: object, *a: object, **k: object) -> None:
            raise OSError(errno.EIO, "Input/output error")
        monkeypatch.setattr(os, "unlink", failing)
        with pytest.raises(OSError):
            c.checkpoint()
        monkeypatch.undo()
        c.write(0, b"x")  # an overwrite: into the journal that is still there
        c.truncate(B)  # checkpoints (now removing the journal), then drops block 1
        new = os.urandom(B)
        c.write(B, new)  # past the end: in place
        c.fsync(False)
        if after_crash:
            crash(c)
        else:
            c.close()
        c, notes = files.load(after_crash=after_crash)
        assert c.read(B, B) == new and not files.journal().exists()
        c.close()


def test_a_failed_write_whose_undo_cannot_sync_leaves_no_entry_past_the_journal(
        files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    c = files.create()
    base = os.urandom(2 * B)
    c.write(0, base)
    c.fsync(False)
    c.write(0, b"x")  # journaled, unsynced: the appends below join the journal
    real = os.pwritev
    calls: list[int] = []

    def full_after_one(fd: int, buffers: list, offset: int) -> int:
        calls.append(offset)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, buffers, offset)

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(os, "pwritev", full_after_one)
    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(OSError):
        c.write(B, os.urandom(2 * B))  # block 1 journaled, block 2's append fails, the undo's sync too
    monkeypatch.undo()
    assert c.read(B, B) == base[B:]  # the entry of block 1 is the one before the write
    for call in (lambda: c.fsync(False), lambda: c.write(0, os.urandom(B))):
        with pytest.raises(OSError) as e:
            call()  # nothing is acknowledged, or changed, after a failed sync
        assert e.value.errno == errno.EIO
    assert c.read(B, B) == base[B:]
    crash(c)
    c, _notes = files.load()
    assert c.read(B, B) == base[B:]


def test_a_failed_journal_sync_is_never_followed_by_a_sync_record(
        files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux reports a failed writeback once and marks the pages clean: an fsync retried after
    a failed one would succeed over lost pages, and its sync record would make them durable in
    the journal's word. Every later sync of the content fails instead."""
    c = files.create()
    c.write(0, os.urandom(2 * B))
    c.fsync(False)
    c.write(0, os.urandom(B))
    c.fsync(False)  # a durable journal
    c.write(B, os.urandom(B))
    length = c.journal.length

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(OSError):
        c.fsync(False)
    monkeypatch.undo()
    for call in (lambda: c.fsync(False), c.checkpoint, lambda: c.write(0, b"x"), lambda: c.truncate(B),
                 lambda: sparse.fallocate_content(c, sparse.FALLOC_FL_ZERO_RANGE, 0, B)):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EIO
    assert c.journal.length == length  # no sync record after the failed sync


def test_a_failed_sync_of_the_backing_file_is_never_followed_by_a_good_one(
        files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    """As for the journal: an append written in place whose fdatasync failed is not made to
    look durable by a retried fsync, nor by the synced size its state would then record."""
    c = files.create()
    c.write(0, os.urandom(B))
    c.fsync(False)
    synced = c.state.synced_size
    c.write(B, os.urandom(B))  # past the end: in place

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(os, "fdatasync", failing)
    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError):
        c.fsync(True)
    monkeypatch.undo()
    for datasync in (True, False):
        with pytest.raises(OSError) as e:
            c.fsync(datasync)
        assert e.value.errno == errno.EIO
    assert c.state.synced_size == synced


@pytest.mark.parametrize("failing", ["fdatasync", "ftruncate"])
def test_a_failed_truncate_leaves_the_old_file_or_the_cut_one(files: Files, monkeypatch: pytest.MonkeyPatch,
                                                              failing: str) -> None:
    """A truncate to inside a block journals the short new last block, syncs the journal, then
    cuts the backing file. Either step failing leaves reads of the old bytes or of the cut file,
    never a mix, acknowledges nothing after, and a crash recovers one of the two."""
    c = files.create()
    data = os.urandom(3 * B)
    c.write(0, data)
    c.fsync(False)
    real = getattr(os, failing)

    def fail_once(*args: object) -> None:
        monkeypatch.setattr(os, failing, real)
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(os, failing, fail_once)
    with pytest.raises(OSError):
        c.truncate(B + 10)
    monkeypatch.undo()
    assert c.size in (3 * B, B + 10) and c.read(0, 3 * B) == data[:c.size]
    with pytest.raises(OSError) as e:
        c.fsync(False)
    assert e.value.errno == errno.EIO
    crash(c)
    c, _notes = files.load()
    assert c.size in (3 * B, B + 10) and c.read(0, 3 * B) == data[:c.size]


def test_a_journal_whose_creation_failed_twice_is_taken_by_the_next_one(
        files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    """Creating a journal, its header write fails and so does the unlink that undoes it: the
    empty file left behind is taken by the next creation (not EEXIST for every overwrite)."""
    c = files.create()
    c.write(0, os.urandom(2 * B))
    c.fsync(False)

    def failing(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(os, "pwritev", failing)
    monkeypatch.setattr(os, "unlink", failing)
    with pytest.raises(OSError):
        c.write(0, os.urandom(B))
    monkeypatch.undo()
    assert files.journal().exists() and files.journal().stat().st_size == 0
    new = os.urandom(B)
    c.write(0, new)
    c.fsync(False)
    crash(c)
    c, _notes = files.load()
    assert c.read(0, B) == new


def test_a_journal_of_another_file_with_the_same_id_is_not_taken(files: Files) -> None:
    c = files.create()
    c.write(0, os.urandom(2 * B))
    c.fsync(False)
    files.journal().parent.mkdir(exist_ok=True)
    files.journal().write_bytes(b"ENCJ" + bytes(60))  # a journal: longer than a header
    with pytest.raises(FileExistsError):
        c.write(0, os.urandom(B))
    assert files.journal().read_bytes() == b"ENCJ" + bytes(60)


def test_a_failed_append_that_cannot_be_cut_back_leaves_the_file_as_it_was(
        files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    c = files.create()
    old = os.urandom(2 * B)
    c.write(0, old)
    c.fsync(False)
    c.write(2 * B, old[:B])  # in place, not synced: the write past the end below goes in place too
    old += old[:B]
    real = contentwrite.pwrite_all

    def fail_in_place(fd: int, data: bytes, offset: int) -> None:
        real(fd, bytes(memoryview(data)[:100]), offset)  # part of it reaches the file first
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    real_ftruncate = os.ftruncate

    def no_cut_back(fd: int, length: int) -> None:
        if fd == c.fd:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        real_ftruncate(fd, length)  # the journal's undo works
    monkeypatch.setattr(contentwrite, "pwrite_all", fail_in_place)
    monkeypatch.setattr(os, "ftruncate", no_cut_back)
    with pytest.raises(OSError):
        c.write(B, os.urandom(3 * B))  # blocks 1-2 (they exist): journaled; block 3 in place
    monkeypatch.undo()
    assert c.size == len(old) and c.read(0, 4 * B) == old and not c.index
    with pytest.raises(OSError) as e:
        c.fsync(False)
    assert e.value.errno == errno.EIO
    crash(c)
    c, _notes = files.load()  # what was never acknowledged past the synced size is cut
    assert 2 * B <= c.size <= len(old) and c.read(0, 4 * B) == old[:c.size]


def test_a_journal_that_cannot_be_cut_back_stops_the_file_taking_changes(
        files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    """A truncate journals the short new last block and syncs it; the sync record's write fails,
    and so does every cut that would take the record back out: the journal keeps a durable record
    that the content no longer indexes. No later write may be journaled behind it (a replay
    would put the short block in the middle of the file): the file refuses changes, and the next
    load reads the journal as it is (the truncate happened)."""
    c = files.create()
    data = os.urandom(3 * B)
    c.write(0, data)
    c.fsync(False)
    real = os.pwritev

    def no_sync_record(fd: int, buffers: list, offset: int) -> int:
        if bytes(memoryview(buffers[0])[:4]) == b"EJSY":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, buffers, offset)

    def failing(*args: object) -> None:
        raise OSError(errno.EDQUOT, "Disk quota exceeded")
    monkeypatch.setattr(os, "pwritev", no_sync_record)
    monkeypatch.setattr(os, "ftruncate", failing)
    with pytest.raises(OSError):
        c.truncate(B + 10)
    monkeypatch.undo()
    assert c.size == 3 * B and c.read(0, 3 * B) == data
    with pytest.raises(OSError) as e:
        c.write(2 * B, os.urandom(B))
    assert e.value.errno == errno.EIO
    crash(c)
    c, _notes = files.load()
    assert c.size in (3 * B, B + 10) and c.read(0, 3 * B) == data[:c.size]
