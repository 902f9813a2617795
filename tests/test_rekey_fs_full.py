"""`encfs rekey --full CIPHERDIR` (issue #21): every file gets a fresh file id and data key and
every block is re-encrypted; after it the old CMK can be disabled; a kill -9 at random moments,
each followed by the same command, loses nothing (checked byte for byte through a fresh mount).
ENCFS_STRESS=1 runs more files and more kill rounds."""

from __future__ import annotations

import json
import os
from pathlib import Path

from fuse_helpers import Mount
from rekey_kills import kill_and_rerun
from test_rekey_fs import (  # noqa: F401  (the fixture)
    Tree,
    backing,
    config_key,
    home,
    key_id,
    make,
    mount_refused,
    ok,
    regular,
    verify,
)

from encfs.fuse.fileheader import HEADER_LEN, FileHeader
from encfs.fuse.rewrap import MARKER

STRESS = bool(os.environ.get("ENCFS_STRESS"))
KILLS_WANTED = 10 if STRESS else 3  # rounds whose kill left the re-key unfinished


def file_ids(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: FileHeader.parse(v[:HEADER_LEN]).file_id for k, v in files.items()}


def test_full_gives_every_file_a_fresh_key_and_the_old_cmk_can_go(tmp_path: Path, home: Path) -> None:
    cipher, plain, tree, xattrs = make(tmp_path, home, files=30)
    before = regular(backing(cipher))
    for i, name in enumerate(before):  # mtimes a re-key must keep (not "now")
        os.utime(cipher / name, ns=(1_700_000_000_000_000_000 + i, 1_700_000_000_000_000_000 - 86_400 * 10**9 + i))
    times = {name: (cipher / name).stat().st_mtime_ns for name in before}
    dry = json.loads(ok(home, "rekey", cipher, "--full", "--key", "b", "--dry-run", "--json"))
    assert dry["Full"] and dry["DryRun"] and regular(backing(cipher)) == before
    out = json.loads(ok(home, "rekey", cipher, "--full", "--key", "b", "--json"))
    assert (out["Full"], out["KeyId"], out["Damaged"]) == (True, key_id(home, "b"), [])
    assert out["Files"] == dry["Files"] == len({(cipher / k).stat().st_ino for k in before})
    after = regular(backing(cipher))
    assert after.keys() == before.keys()
    # The plaintext's mtime is the backing file's, and a re-key changes no content (the atime is an
    # access time: reading a file to re-seal it may move it, as any reader does under relatime).
    assert {name: (cipher / name).stat().st_mtime_ns for name in before} == times
    old_ids, new_ids = file_ids(before), file_ids(after)
    for name, data in before.items():
        assert new_ids[name] != old_ids[name]  # a fresh file id and data key
        block = data[HEADER_LEN:HEADER_LEN + 1024]
        assert not block or block not in after[name]  # every block re-sealed
    assert config_key(cipher) == [key_id(home, "b")] * 2
    assert not list((cipher / "encfs.journal").iterdir()) and not (cipher / MARKER).exists()
    ok(home, "key", "disable", "a")
    with Mount(cipher, plain, home):
        verify(plain, tree, xattrs)


def test_full_killed_at_random_moments_is_finished_by_running_it_again(tmp_path: Path, home: Path) -> None:
    cipher, plain = tmp_path / "cipher", tmp_path / "plain"
    plain.mkdir()
    ok(home, "init", cipher, "--key", "a")
    tree: Tree = {}
    sizes = (0, 1, 70_000, 3 << 20) if not STRESS else (0, 1, 70_000, 3 << 20, 20 << 20)
    with Mount(cipher, plain, home):
        for i in range(60 if not STRESS else 200):
            data = os.urandom(sizes[i % len(sizes)] + i)
            (plain / f"f{i}").write_bytes(data)
            tree[f"f{i}"] = ("file", data)
        with open(plain / "f1", "r+b") as f:  # a file with a journal: overwritten blocks
            f.write(b"x" * 5)
            os.fsync(f.fileno())
        tree["f1"] = ("file", b"x" * 5 + tree["f1"][1][5:])

    def after_kill(dest: str) -> None:
        line = mount_refused(home, cipher, plain)
        assert f"run `encfs rekey --full {cipher}` again" in line, line

    def after_rerun(dest: str) -> None:
        out = json.loads(ok(home, "rekey", cipher, "--full", "--key", dest, "--json"))
        assert out["KeyId"] == key_id(home, dest) and out["Damaged"] == [] and not (cipher / MARKER).exists()
        with Mount(cipher, plain, home, "-o", "ro"):
            verify(plain, tree, {}, sample=8)

    _rounds, dest = kill_and_rerun(cipher, home, KILLS_WANTED, (cipher / MARKER).exists, after_kill, after_rerun)
    ok(home, "key", "disable", "b" if dest == "a" else "a")
    with Mount(cipher, plain, home):
        verify(plain, tree, {})
