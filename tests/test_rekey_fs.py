"""`encfs rekey CIPHERDIR` (issue #21): a re-wrap moves every file's wrapped data key and the
filesystem key to another CMK without rewriting content, after which the old CMK can be disabled
and every file, name, symlink and xattr still reads through a fresh mount; it is refused on a
mounted CIPHERDIR, changes nothing with --dry-run, and a kill -9 at any moment is finished by
running it again (mounts in between refuse in one line). Real SoftHSM2 token, real FUSE mounts,
the real CLI in subprocesses. ENCFS_STRESS=1 runs more files and more kill rounds."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from fuse_helpers import Mount
from test_rekey_rewrap import fails, home, key_id, ok  # noqa: F401  (home: the fixture)

from encfs.fuse.fileheader import HEADER_LEN, FileHeader
from encfs.fuse.mount import is_mounted
from encfs.fuse.names import is_internal
from encfs.fuse.rewrap import MARKER, REDO, pack_redo

STRESS = bool(os.environ.get("ENCFS_STRESS"))
KILL_FILES = 10_000 if STRESS else 2_500
KILLS_WANTED = 10 if STRESS else 3  # rounds whose kill left the re-key unfinished


def mount_refused(home: Path, cipher: Path, plain: Path) -> str:
    """The one line a refused `encfs mount` prints (a mount that is not refused is undone)."""
    try:
        return fails(home, "mount", cipher, plain)
    finally:
        if is_mounted(plain):
            subprocess.run(["fusermount3", "-u", str(plain)], capture_output=True, timeout=30)



def config_key(cipher: Path) -> list[str]:
    return [json.loads((cipher / n).read_text())["key_id"] for n in ("encfs.conf", "encfs.conf.bak")]



Tree = dict[str, tuple[str, bytes]]  # plaintext path -> ("file" | "link" | "dir", content or target)


def populate(plain: Path, files: int = 40) -> tuple[Tree, dict[str, dict[str, bytes]]]:
    """Files of several sizes (empty, one block, many blocks), nested and long names, a hard link,
    short and long symlinks, xattrs. Returns the tree and the xattrs, as written."""
    tree: Tree = {}
    xattrs: dict[str, dict[str, bytes]] = {}
    long_name = "n" * 200
    for d in ("", "sub", f"sub/{long_name}"):
        if d:
            (plain / d).mkdir()
            tree[d] = ("dir", b"")
    for i in range(files):
        rel = f"{['', 'sub/', f'sub/{long_name}/'][i % 3]}f{i}"
        data = os.urandom([0, 1, 4096, 40_000, 100_003][i % 5] + i)
        (plain / rel).write_bytes(data)
        tree[rel] = ("file", data)
    os.link(plain / "f3", plain / "sub/hardlink")
    tree["sub/hardlink"] = tree["f3"]
    for rel, target in (("short", "f3"), ("sub/long", "t" * 3000)):
        os.symlink(target, plain / rel)
        tree[rel] = ("link", target.encode())
    for rel in ("f3", "sub", f"sub/{long_name}/f2"):
        value = os.urandom(50)
        os.setxattr(plain / rel, "user.note", value, follow_symlinks=False)
        xattrs[rel] = {"user.note": value}
    return tree, xattrs


def verify(plain: Path, tree: Tree, xattrs: dict[str, dict[str, bytes]], sample: int | None = None) -> None:
    items = sorted(tree.items())
    if sample is not None:
        items = random.sample(items, min(sample, len(items)))
    for rel, (kind, content) in items:
        p = plain / rel
        if kind == "dir":
            assert p.is_dir(), rel
        elif kind == "link":
            assert os.readlink(p) == content.decode(), rel
        else:
            assert p.read_bytes() == content, rel
    for rel, values in xattrs.items():
        for name, value in values.items():
            assert os.getxattr(plain / rel, name, follow_symlinks=False) == value, rel
    if sample is None:
        listed = {str(p.relative_to(plain)) for p in plain.rglob("*")}
        assert listed == set(tree), listed ^ set(tree)


def backing(cipher: Path) -> dict[str, bytes]:
    """Every backing file (bookkeeping included) by path, as bytes."""
    out = {}
    for dirpath, _dirs, names in os.walk(cipher):
        for n in names:
            p = Path(dirpath) / n
            if not p.is_symlink():
                out[str(p.relative_to(cipher))] = p.read_bytes()
    return out


def regular(files: dict[str, bytes]) -> dict[str, bytes]:
    """User files with a header (no bookkeeping, no empty files)."""
    return {k: v for k, v in files.items() if v and not any(is_internal(os.fsencode(c)) for c in Path(k).parts)}


def inodes(cipher: Path, files: dict[str, bytes]) -> int:
    return len({(cipher / k).stat().st_ino for k in files})


def make(tmp_path: Path, home: Path, files: int = 40) -> tuple[Path, Path, Tree, dict[str, dict[str, bytes]]]:
    cipher, plain = tmp_path / "cipher", tmp_path / "plain"
    plain.mkdir()
    ok(home, "init", cipher, "--key", "a", "--wrapped-file-keys")  # a header per file to move
    with Mount(cipher, plain, home):
        tree, xattrs = populate(plain, files)
    return cipher, plain, tree, xattrs


def test_a_rewrapped_filesystem_reads_back_whole_with_its_old_cmk_disabled(tmp_path: Path, home: Path) -> None:
    cipher, plain, tree, xattrs = make(tmp_path, home)
    before = regular(backing(cipher))
    out = json.loads(ok(home, "rekey", cipher, "--key", "b", "--json"))
    a, b = key_id(home, "a"), key_id(home, "b")
    assert (out["Kind"], out["Changed"], out["DryRun"], out["SourceKeyId"], out["KeyId"], out["KeyVersion"]) == \
        ("filesystem", True, False, a, b, 1)
    files = inodes(cipher, before)  # a hard link's file once
    assert out["Files"] == files and out["WrappedKeys"] == files + 1 and out["Damaged"] == []
    after = regular(backing(cipher))
    assert after.keys() == before.keys()
    for name, data in before.items():  # every header changed, not one content byte
        assert after[name][:HEADER_LEN] != data[:HEADER_LEN] and after[name][HEADER_LEN:] == data[HEADER_LEN:]
    assert config_key(cipher) == [b, b]
    assert not (cipher / MARKER).exists() and not (cipher / REDO).exists()
    ok(home, "key", "disable", "a")
    with Mount(cipher, plain, home):
        verify(plain, tree, xattrs)
        (plain / "new").write_bytes(b"written under b")  # new files get keys under b
    ok(home, "key", "schedule-deletion", "a", "--days", "7")
    with Mount(cipher, plain, home, "-o", "ro"):
        verify(plain, {**tree, "new": ("file", b"written under b")}, xattrs)


def test_without_key_it_moves_to_the_newest_version_then_has_nothing_to_do(tmp_path: Path, home: Path) -> None:
    cipher, plain, tree, xattrs = make(tmp_path, home, files=10)
    a = key_id(home, "a")
    assert json.loads(ok(home, "rekey", cipher, "--json"))["Changed"] is False  # already at version 1
    ok(home, "key", "rotate", "a")
    out = json.loads(ok(home, "rekey", cipher, "--json"))
    files = regular(backing(cipher))
    assert (out["KeyId"], out["SourceKeyVersion"], out["KeyVersion"], out["Files"]) == (a, 1, 2, inodes(cipher, files))
    text = ok(home, "rekey", cipher)
    assert "nothing to do" in text and "version 2" in text
    assert json.loads(ok(home, "rekey", cipher, "--json"))["WrappedKeys"] == 0
    assert regular(backing(cipher)) == files
    with Mount(cipher, plain, home):
        verify(plain, tree, xattrs)


def test_dry_run_counts_and_changes_nothing(tmp_path: Path, home: Path) -> None:
    cipher, _plain, _tree, _x = make(tmp_path, home, files=12)
    before = backing(cipher)
    text = ok(home, "rekey", cipher, "--key", "b", "--dry-run")
    files = inodes(cipher, regular(before))
    assert f"would re-wrap {files} file keys and the filesystem key" in text, text
    out = json.loads(ok(home, "rekey", cipher, "--key", "b", "--dry-run", "--json"))
    assert (out["DryRun"], out["Changed"], out["Files"]) == (True, True, files)
    assert backing(cipher) == before


def test_a_mounted_cipherdir_is_refused(tmp_path: Path, home: Path) -> None:
    cipher, plain, tree, xattrs = make(tmp_path, home, files=6)
    before = backing(cipher)
    with Mount(cipher, plain, home):
        line = fails(home, "rekey", cipher, "--key", "b")
        assert "already mounted" in line, line
        verify(plain, tree, xattrs)
    del before["encfs.lock"]
    assert {k: v for k, v in backing(cipher).items() if k != "encfs.lock"} == before


def test_a_full_disk_before_the_marker_is_one_line_and_changes_nothing(tmp_path: Path, home: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=True)
    try:
        cipher, plain = disk / "cipher", tmp_path / "plain"
        plain.mkdir()
        ok(home, "init", cipher, "--key", "a", "--wrapped-file-keys")
        with Mount(cipher, plain, home):
            (plain / "f").write_bytes(b"hello")
        fd = os.open(disk / "fill", os.O_WRONLY | os.O_CREAT, 0o600)
        with contextlib.suppress(OSError):  # to the last block
            while True:
                os.write(fd, bytes(4096))
        os.close(fd)
        before = backing(cipher)
        for args in ((), ("--full",)):
            line = fails(home, "rekey", cipher, "--key", "b", *args)
            assert "No space left on device" in line and "internal error" not in line, line
            after = backing(cipher)
            assert sorted(after) == sorted(before)
            assert [k for k in before if after[k] != before[k]] in ([], ["encfs.lock"])  # its record only
        (disk / "fill").unlink()
        with Mount(cipher, plain, home):
            assert (plain / "f").read_bytes() == b"hello"
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_an_interrupted_run_with_torn_headers_and_split_config_is_finished(tmp_path: Path, home: Path) -> None:
    """The state a crash can leave, made by hand: the redo log of a batch whose headers are torn
    (half new, half old) or still old, headers of a later batch still old, encfs.conf.bak under
    the new CMK and encfs.conf under the old one. Mounts refuse; `encfs rekey` finishes the job."""
    cipher, plain, tree, xattrs = make(tmp_path, home, files=30)
    old = backing(cipher)
    ok(home, "rekey", cipher, "--key", "b")
    new = backing(cipher)
    names = sorted(regular(new))
    batch, later = names[:len(names) // 2], names[len(names) // 2:]
    times = {n: ((cipher / n).stat().st_atime_ns, (cipher / n).stat().st_mtime_ns) for n in batch}
    (cipher / REDO).write_bytes(pack_redo([(os.fsencode(n), new[n][:HEADER_LEN], times[n]) for n in batch]))
    for i, n in enumerate(batch + later):
        head = old[n][:HEADER_LEN] if i % 2 or n in later else new[n][:64] + old[n][64:HEADER_LEN]
        with open(cipher / n, "r+b") as f:
            f.write(head)
    (cipher / "encfs.conf").write_bytes(old["encfs.conf"])
    b = key_id(home, "b")
    (cipher / MARKER).write_text(json.dumps({"version": 1, "operation": "rewrap", "key_id": b, "recovering": False}))
    line = mount_refused(home, cipher, plain)
    assert "`encfs rekey" in line and "interrupted" in line, line
    out = json.loads(ok(home, "rekey", cipher, "--json"))  # no --key: on to the marker's CMK
    assert (out["Resumed"], out["KeyId"], out["Damaged"]) == (True, b, [])
    assert config_key(cipher) == [b, b] and not (cipher / MARKER).exists() and not (cipher / REDO).exists()
    ok(home, "key", "disable", "a")
    with Mount(cipher, plain, home):
        verify(plain, tree, xattrs)


def _dest(round_no: int) -> str:
    return "b" if round_no % 2 == 0 else "a"


def test_kill_9_at_random_moments_then_rerun_finishes(tmp_path: Path, home: Path) -> None:
    """kill -9 during re-wraps of a few thousand files (to b, then back to a, ...): a mount in
    between works, or refuses in one line naming `encfs rekey`; running it again finishes it; in
    the end the CMK not used last is disabled and every file reads back."""
    cipher, plain = tmp_path / "cipher", tmp_path / "plain"
    plain.mkdir()
    ok(home, "init", cipher, "--key", "a", "--wrapped-file-keys")  # a header per file to move
    tree: Tree = {}
    with Mount(cipher, plain, home):
        for d in range(KILL_FILES // 500):
            (plain / f"d{d}").mkdir()
            tree[f"d{d}"] = ("dir", b"")
            for i in range(500):
                data = os.urandom(random.choice((10, 5000, 40_000)))
                (plain / f"d{d}/f{i}").write_bytes(data)
                tree[f"d{d}/f{i}"] = ("file", data)
    env = dict(os.environ, ENCFS_HOME=str(home))
    env.pop("SOFTHSM2_CONF", None)
    # How long a whole run takes on this machine (its start-up included): the kills land within
    # it, so that most of them interrupt a re-key however fast or loaded the machine is.
    start = time.monotonic()
    ok(home, "rekey", cipher, "--key", _dest(0))
    whole = time.monotonic() - start
    interrupted, rounds = 0, 1
    rng = random.Random()
    while interrupted < KILLS_WANTED:
        assert rounds <= 8 * KILLS_WANTED, f"only {interrupted} of {rounds - 1} kills interrupted a re-key"
        dest = _dest(rounds)
        proc = subprocess.Popen([sys.executable, "-m", "encfs", "rekey", str(cipher), "--key", dest],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            if rounds % 2:  # anywhere from the start (scan, first batch) ...
                time.sleep(rng.uniform(0.1, whole))
            else:  # ... or once headers are changing
                deadline = time.monotonic() + 60
                while not (cipher / MARKER).exists() and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.002)
                time.sleep(rng.uniform(0, whole / 3))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        rounds += 1
        if (cipher / MARKER).exists():
            interrupted += 1
            line = mount_refused(home, cipher, plain)
            assert f"run `encfs rekey {cipher}` again" in line, line
        else:
            with Mount(cipher, plain, home):
                verify(plain, tree, {}, sample=30)
        out = json.loads(ok(home, "rekey", cipher, "--key", dest, "--json"))
        assert out["KeyId"] == key_id(home, dest) and out["Damaged"] == []
        assert config_key(cipher) == [out["KeyId"]] * 2 and not (cipher / MARKER).exists()
    ok(home, "key", "disable", "a" if _dest(rounds - 1) == "b" else "b")
    with Mount(cipher, plain, home):
        verify(plain, tree, {})


def test_the_side_file_of_an_interrupted_file_rekey_moves_too(tmp_path: Path, home: Path) -> None:
    """A complete side file encfs.journal/<id>.rekey (a file's fresh-key re-seal a crash cut short,
    FORMAT.md §6.4) holds a header that the next mount copies in: it is re-wrapped with the rest."""
    cipher, plain, tree, xattrs = make(tmp_path, home, files=6)
    name = next(k for k, v in regular(backing(cipher)).items() if len(v) > HEADER_LEN)
    file_id = FileHeader.parse((cipher / name).read_bytes()[:HEADER_LEN]).file_id
    (cipher / "encfs.journal").mkdir(exist_ok=True)
    side = cipher / "encfs.journal" / f"{file_id.hex()}.rekey"
    shutil.copy2(cipher / name, side)  # the shape of a complete side file: header, blocks, state
    out = json.loads(ok(home, "rekey", cipher, "--key", "b", "--json"))
    assert out["Files"] == inodes(cipher, regular(backing(cipher))) + 1
    ok(home, "key", "disable", "a")
    with Mount(cipher, plain, home) as m:
        verify(plain, tree, xattrs)
    assert not side.exists() and "finished giving it a fresh data key" in m.log.read_text()
