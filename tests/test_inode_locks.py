"""The filesystem server's locks (encfs.fuseproto.rwlock.FsLocks): operations on different inodes
run side by side, one inode's changes one at a time, tree changes alone, and the lock order is
enforced. Threads meet at barriers inside the locks they hold: a barrier that times out means
the locks kept them apart."""

from __future__ import annotations

import contextlib
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from encfs.fuse.fs import EncryptedFS
from encfs.fuse.fsconfig import init_filesystem, open_config
from encfs.fuse.openfiles import OpenFile
from encfs.fuseproto.rwlock import FsLocks, LockOrderError
from encfs.keys.service import KeyService

WAIT = 10.0  # seconds: bound on every wait below (none is expected to take long)


def _together(*holders: Callable[[Callable[[], None]], None]) -> list[BaseException]:
    """Run each holder in a thread, passing it a function that waits for all of them (a
    barrier); returns the failures."""
    barrier = threading.Barrier(len(holders), timeout=WAIT / 5)
    failures: list[BaseException] = []

    def meet() -> None:
        barrier.wait()

    def run(holder: Callable[[Callable[[], None]], None]) -> None:
        try:
            holder(meet)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            failures.append(e)

    threads = [threading.Thread(target=run, args=(h,), daemon=True) for h in holders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 3)
    assert not any(t.is_alive() for t in threads)
    return failures


def _poll(cond: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_different_inodes_are_held_at_once() -> None:
    locks = FsLocks()

    def on(inode: int) -> Callable[[Callable[[], None]], None]:
        def hold(meet: Callable[[], None]) -> None:
            with locks.inode(inode):
                meet()
        return hold

    assert _together(on(5), on(6), on(7)) == []
    assert locks.inodes_in_use() == 0  # a lock exists only while used


def test_one_inode_shared_by_readers_and_exclusive_for_changes() -> None:
    locks = FsLocks()

    def reader(meet: Callable[[], None]) -> None:
        with locks.inode(5, exclusive=False):
            meet()

    assert _together(reader, reader) == []

    def writer(meet: Callable[[], None]) -> None:
        with locks.inode(5):
            meet()

    failures = _together(writer, writer)  # the second waits for the first, which waits at the barrier
    assert failures and all(isinstance(e, threading.BrokenBarrierError) for e in failures)


def test_a_change_to_an_inode_waits_for_its_reader_and_blocks_later_ones() -> None:
    locks, order = FsLocks(), []
    reading, release = threading.Event(), threading.Event()

    def reader() -> None:
        with locks.inode(5, exclusive=False):
            reading.set()
            release.wait(WAIT)
            order.append("read")

    def writer() -> None:
        with locks.inode(5):
            order.append("write")

    def later_reader() -> None:
        with locks.inode(5, exclusive=False):
            order.append("later read")

    r = threading.Thread(target=reader)
    r.start()
    assert reading.wait(WAIT)
    w = threading.Thread(target=writer)
    w.start()
    _poll(lambda: locks._inodes[5].users == 2)  # the writer waits for the lock
    w.join(0.1)
    assert order == [] and w.is_alive()
    later = threading.Thread(target=later_reader)
    later.start()
    _poll(lambda: locks._inodes[5].users == 3)
    later.join(0.1)
    assert order == [] and later.is_alive()  # no reader jumps the queued change
    release.set()
    for th in (r, w, later):
        th.join(WAIT)
    assert order == ["read", "write", "later read"]
    assert locks.inodes_in_use() == 0


def test_a_tree_change_waits_for_inode_holders_and_runs_alone() -> None:
    locks, order = FsLocks(), []
    holding, release = threading.Event(), threading.Event()

    def data_op() -> None:
        with locks.inode(5):
            holding.set()
            release.wait(WAIT)
            order.append("data")

    def tree_op() -> None:
        with locks.tree():
            order.append("tree")

    def later_data_op() -> None:
        with locks.inode(6):
            order.append("later")

    d = threading.Thread(target=data_op)
    d.start()
    assert holding.wait(WAIT)
    t = threading.Thread(target=tree_op)
    t.start()
    _poll(lambda: locks.namespace._waiting == 1)  # the tree change is queued
    later = threading.Thread(target=later_data_op)
    later.start()
    later.join(0.1)
    assert order == [] and later.is_alive()  # a queued tree change goes before later data operations
    release.set()
    for th in (d, t, later):
        th.join(WAIT)
    assert order == ["data", "tree", "later"]


def test_random_holders_never_overlap_wrongly() -> None:
    """Threads take tree, shared and exclusive inode locks at random on three inodes and check,
    inside each, that nothing the lock excludes is held (a count per kind, under its own mutex)."""
    locks, seen, mutex = FsLocks(), [], threading.Lock()
    tree_held, shared, exclusive = [0], {5: 0, 6: 0, 7: 0}, {5: 0, 6: 0, 7: 0}

    def check(ok: bool, what: str) -> None:
        if not ok:
            seen.append(what)

    def work(seed: int) -> None:
        try:
            hold_at_random(seed)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            seen.append(repr(e))

    def hold_at_random(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(3000):
            kind, inode = rng.randrange(5), rng.choice((5, 6, 7))
            if kind == 0:
                with locks.tree():
                    with mutex:
                        check(not any(shared.values()) and not any(exclusive.values()) and not tree_held[0],
                              "tree with others")
                        tree_held[0] += 1
                    time.sleep(0)
                    with mutex:
                        tree_held[0] -= 1
                continue
            excl = kind == 1
            with locks.inode(inode, exclusive=excl):
                with mutex:
                    check(not tree_held[0], "inode under tree")
                    check(not exclusive[inode] and (not excl or not shared[inode]), f"inode {inode} overlap")
                    (exclusive if excl else shared)[inode] += 1
                time.sleep(0)
                with mutex:
                    (exclusive if excl else shared)[inode] -= 1

    threads = [threading.Thread(target=work, args=(seed,), daemon=True) for seed in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + WAIT * 6
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads)
    assert seen == []
    assert locks.inodes_in_use() == 0 and locks.namespace._shared == 0


def test_a_stream_of_changes_to_an_inode_lets_a_reader_in() -> None:
    """Writers that queue behind each other without pause do not keep a reader out: only a
    change waiting for readers to leave holds new readers back."""
    locks, stop, got_in = FsLocks(), threading.Event(), threading.Event()

    def writer() -> None:
        while not stop.is_set():
            with locks.inode(5):
                time.sleep(0.001)

    writers = [threading.Thread(target=writer, daemon=True) for _ in range(3)]
    for t in writers:
        t.start()
    try:
        _poll(lambda: 5 in locks._inodes and locks._inodes[5].users >= 2)  # writers queue up

        def reader() -> None:
            with locks.inode(5, exclusive=False):
                got_in.set()

        threading.Thread(target=reader, daemon=True).start()
        assert got_in.wait(WAIT), "a reader waited behind the writers' stream"
    finally:
        stop.set()
        for t in writers:
            t.join(WAIT)
    assert locks.inodes_in_use() == 0


def test_a_tree_change_that_waited_is_seen_by_a_quiet_mark_taken_meanwhile() -> None:
    """quiet_mark()/still_quiet() (server.py's answers before the locks): a tree change that was
    waiting for an inode's holder when the mark was taken, and ran after, is not missed."""
    locks = FsLocks()
    holding, release, tree_done = threading.Event(), threading.Event(), threading.Event()

    def data_op() -> None:
        with locks.inode(5):
            holding.set()
            release.wait(WAIT)

    def tree_op() -> None:
        with locks.tree():
            pass
        tree_done.set()

    d = threading.Thread(target=data_op)
    d.start()
    assert holding.wait(WAIT)
    t = threading.Thread(target=tree_op)
    t.start()
    _poll(lambda: locks.namespace._waiting == 1)  # waiting, the mutex let go
    mark = locks.namespace.quiet_mark()
    assert mark is not None
    release.set()
    assert tree_done.wait(WAIT)
    d.join(WAIT)
    t.join(WAIT)
    assert not locks.namespace.still_quiet(mark)


@pytest.mark.parametrize("outer,inner", [("inode", "inode"), ("inode", "same inode"), ("inode", "tree"),
                                         ("tree", "inode"), ("tree", "tree")])
def test_a_second_lock_in_one_thread_is_refused_before_it_waits(outer: str, inner: str) -> None:
    locks = FsLocks()

    def take(what: str) -> contextlib.AbstractContextManager[None]:
        return locks.tree() if what == "tree" else locks.inode(5 if what == "same inode" else 6)

    def nest(meet: Callable[[], None]) -> None:
        with locks.inode(5) if outer == "inode" else locks.tree(), pytest.raises(LockOrderError), \
                take(inner):
            pass
        with locks.inode(7):  # the refusal left the thread's bookkeeping as it was
            pass
        meet()

    assert _together(nest) == []
    assert locks.inodes_in_use() == 0


def test_the_handle_table_is_walked_while_other_inodes_open_and_close(tmp_path: Path, service: KeyService) -> None:
    """OpenFiles under FsServer's locks: a data operation on one inode walks the handle table
    (fd_of, for a file with no name left) while another inode's handles come and go, as FsLocks
    lets them. Without the table's own lock the walk meets a table that changed under it."""
    key = service.create_key()["KeyId"]
    cipher = tmp_path / "cipher"
    init_filesystem(cipher, service, key)
    opened = open_config(cipher, service, writable=True)
    fs = EncryptedFS(os.fsencode(cipher), opened.config, opened.keys, service)
    locks = FsLocks()
    null = os.open(os.devnull, os.O_RDONLY)
    handles: list[int] = []
    done = threading.Event()

    def walk(meet: Callable[[], None]) -> None:  # inode 7, gone from every path: found by its handle
        meet()
        while not done.is_set():
            with locks.inode(7):
                assert fs.files.fd_of(7) is not None

    def churn(meet: Callable[[], None]) -> None:
        meet()
        deadline = time.monotonic() + 3.0  # bounded in time too: a loaded machine starves this thread
        try:
            while len(handles) < 20000 and time.monotonic() < deadline:
                with locks.inode(8):
                    fh = fs.files.add(OpenFile(8, os.dup(null), False, b"churn"))
                handles.append(fh)
                with locks.inode(8):
                    fs.files.release(fh)
        finally:
            done.set()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so a walk meets a change if it can
    try:
        for i in range(2000):  # a long table to walk; inode 7's handle is the last one
            fs.files.add(OpenFile(7 if i == 1999 else 100 + i, os.dup(null), False, b"open"))
        failures = _together(walk, churn)
    finally:
        sys.setswitchinterval(interval)
        os.close(null)
        fs.close_all()
    assert failures == []
    assert len(handles) == len(set(handles)) > 0
