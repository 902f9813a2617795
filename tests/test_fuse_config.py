"""Config copies (issue #18 item 6), through real mounts on a real token.

Each copy of the config is authenticated as a whole (format 2: a MAC under a
key derived from the filesystem secret). A damaged copy is ignored, logged and
rewritten from the good one by a read-write mount; two valid copies that
disagree refuse the mount. Filesystems made by the release before format 2
(tests/data/fs-v1.tar.gz, see tests/data/README.md) keep mounting and are
upgraded by their first read-write mount.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from conftest import run_encfs
from fsconfig_tool import remac
from fuse_cli_helpers import assert_one_line_error, encfs_ok, guard, new_fs
from fuse_helpers import Mount
from releases import extract_release

from encfs.errors import InvalidCiphertext
from encfs.fuse.fsconfig import BINDING_FEATURES, FS_FORMAT, SPARSE_FEATURE, features_for, init_filesystem, open_config
from encfs.fuse.mount import is_mounted
from encfs.keys.service import KeyService

CONF, BAK = "encfs.conf", "encfs.conf.bak"
# What tests/data/fs-v1.tar.gz holds in each of its two filesystems (see tests/data/README.md).
V1_FILES = {"hello.txt": b"hello from encfs format 1\n",
            "blocks.bin": bytes((i * 7 + 3) % 251 for i in range(33000)),
            "sub/n.txt": b"nested\n",
            "sub/" + "L" * 230: b"long\n"}


def _check_v1_tree(mp: Path) -> None:
    assert sorted(os.listdir(mp)) == ["blocks.bin", "hello.txt", "link", "sub"]
    for name, data in V1_FILES.items():
        assert (mp / name).read_bytes() == data, name
    assert os.readlink(mp / "link") == "hello.txt"


@pytest.fixture
def v1(tmp_path: Path) -> dict[str, Path]:
    """The ENCFS_HOME and the two CIPHERDIRs (32 KiB and 4 KiB blocks) the previous release made."""
    root = tmp_path / "v1"
    extract_release("fs-v1.tar.gz", root)
    return {"home": root / "home", "cipher": root / "cipher", "cipher-4k": root / "cipher-4k"}


def _copy(cipher: Path, name: str) -> dict:
    return json.loads((cipher / name).read_bytes())


def _flip(path: Path, needle: bytes, index: int, bit: int) -> None:
    """Flip one bit of byte ``index`` of the first ``needle`` in the file."""
    raw = bytearray(path.read_bytes())
    at = raw.index(needle) + index
    raw[at] ^= 1 << bit
    path.write_bytes(bytes(raw))


def _info(cipher: Path, home: Path) -> dict:
    return json.loads(encfs_ok("info", "--json", str(cipher), home=home))


# -- filesystems of the previous release (format 1) -----------------------------------------------------

@pytest.mark.parametrize("fs", ["cipher", "cipher-4k"])
def test_format_1_filesystem_mounts_and_its_first_read_write_mount_upgrades_it(fs: str, v1, tmp_path: Path) -> None:
    cipher, home, mp = v1[fs], v1["home"], tmp_path / "plain"
    mp.mkdir()
    original = {n: (cipher / n).read_bytes() for n in (CONF, BAK)}
    assert _copy(cipher, CONF)["format"] == 1 and "mac" not in _copy(cipher, CONF)
    assert _info(cipher, home)["Format"] == 1
    with guard(cipher, mp):
        with Mount(cipher, mp, home, "--read-only", log=tmp_path / "ro.log"):
            _check_v1_tree(mp)
        assert {n: (cipher / n).read_bytes() for n in (CONF, BAK)} == original, "a read-only mount upgraded"
        with Mount(cipher, mp, home, log=tmp_path / "rw.log"):
            _check_v1_tree(mp)
            (mp / "after-upgrade").write_bytes(b"new" * 20000)
        assert "upgraded the config from format 1 to 2" in (tmp_path / "rw.log").read_text()
        primary, backup = _copy(cipher, CONF), _copy(cipher, BAK)
        assert primary == backup and primary["format"] == 2
        assert len(base64.b64decode(primary["mac"], validate=True)) == 32
        old = json.loads(original[CONF])
        assert {k: primary[k] for k in old if k not in ("format", "features")} == \
            {k: v for k, v in old.items() if k not in ("format", "features")}
        # the same mount bound directory ids and symlink targets to their place (binding.py)
        assert primary["features"] == old["features"] + list(BINDING_FEATURES) + [SPARSE_FEATURE]
        assert "directory ids and symlink targets are bound" in (tmp_path / "rw.log").read_text()
        assert _info(cipher, home)["Format"] == 2
        with Mount(cipher, mp, home, log=tmp_path / "again.log"):
            for name, data in V1_FILES.items():
                assert (mp / name).read_bytes() == data
            assert (mp / "after-upgrade").read_bytes() == b"new" * 20000
        assert "upgraded" not in (tmp_path / "again.log").read_text()


def test_interrupted_upgrade_is_finished(v1, tmp_path: Path) -> None:
    """The upgrade writes the backup, then the primary: a crash between leaves a format-2 backup
    beside a format-1 primary with the same contents. That is no disagreement."""
    cipher, home, mp = v1["cipher"], v1["home"], tmp_path / "plain"
    mp.mkdir()
    v1_primary = (cipher / CONF).read_bytes()
    with guard(cipher, mp):
        with Mount(cipher, mp, home):
            pass
        (cipher / CONF).write_bytes(v1_primary)
        with Mount(cipher, mp, home, "--read-only", log=tmp_path / "ro.log"):
            _check_v1_tree(mp)
        assert "encfs.conf is still format 1 (an interrupted upgrade)" in (tmp_path / "ro.log").read_text()
        assert (cipher / CONF).read_bytes() == v1_primary
        with Mount(cipher, mp, home, log=tmp_path / "rw.log"):
            _check_v1_tree(mp)
        assert "restored encfs.conf from the good copy" in (tmp_path / "rw.log").read_text()
        assert _copy(cipher, CONF) == _copy(cipher, BAK) and _copy(cipher, CONF)["format"] == 2


@pytest.mark.parametrize("copy", [CONF, BAK])
@pytest.mark.parametrize("damage", ["feature-name", "format-digit"])
def test_format_1_copy_with_a_flipped_bit_is_ignored(copy: str, damage: str, v1, tmp_path: Path) -> None:
    """Format 1 has no MAC, but no format-1 copy ever held another format number or a feature this encfs
    does not know: such a copy is damage, not a newer filesystem."""
    cipher, home, mp = v1["cipher"], v1["home"], tmp_path / "plain"
    mp.mkdir()
    if damage == "feature-name":
        _flip(cipher / copy, b'"siv-names"', 1, 0)  # "riv-names"
        cause = "unknown feature 'riv-names'"
    else:
        _flip(cipher / copy, b'"format": 1', 10, 1)  # 1 -> 3: looks newer
        cause = "format 3 without a MAC"
    with guard(cipher, mp):
        with Mount(cipher, mp, home, log=tmp_path / "rw.log"):
            _check_v1_tree(mp)
        log = (tmp_path / "rw.log").read_text()
        assert f"{copy} is damaged ({cause})" in log, log
        assert _copy(cipher, CONF) == _copy(cipher, BAK) and _copy(cipher, CONF)["format"] == 2


# -- format 2 ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("copy", [CONF, BAK])
@pytest.mark.parametrize("damage", ["feature-name", "format-digit-3", "format-digit-0", "garbage"])
def test_damaged_copy_is_ignored_logged_and_restored(copy: str, damage: str, tmp_path: Path,
                                                     fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    other = BAK if copy == CONF else CONF
    with guard(cipher, mp):
        with Mount(cipher, mp, fs_home):
            (mp / "f").write_bytes(b"kept" * 10000)
        good = (cipher / other).read_bytes()
        if damage == "feature-name":
            _flip(cipher / copy, b'"long-names"', 1, 0)  # "mong-names"
        elif damage.startswith("format-digit"):
            _flip(cipher / copy, b'"format": 2', 10, 0 if damage.endswith("3") else 1)
        else:
            (cipher / copy).write_bytes(os.urandom(200))
        damaged = (cipher / copy).read_bytes()
        cause = {"garbage": "not JSON", "format-digit-0": "format 0 never existed"}.get(damage,
                                                                                     "its MAC does not verify")
        with Mount(cipher, mp, fs_home, "--read-only", log=tmp_path / "ro.log"):
            assert (mp / "f").read_bytes() == b"kept" * 10000
        assert f"{copy} is damaged ({cause})" in (tmp_path / "ro.log").read_text()
        assert (cipher / copy).read_bytes() == damaged, "a read-only mount rewrote a copy"
        with Mount(cipher, mp, fs_home, log=tmp_path / "rw.log"):
            assert (mp / "f").read_bytes() == b"kept" * 10000
        log = (tmp_path / "rw.log").read_text()
        assert f"{copy} is damaged ({cause})" in log and f"restored {copy} from the good copy" in log, log
        assert (cipher / copy).read_bytes() == good and (cipher / other).read_bytes() == good
        assert _info(cipher, fs_home)["Warnings"] == []


def test_copies_that_disagree_on_the_block_size_refuse_the_mount(tmp_path: Path, fs_home: Path) -> None:
    """Both copies verify (the test computes the backup's MAC again), so neither is damage: no guessing."""
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        with Mount(cipher, mp, fs_home):
            (mp / "f").write_bytes(os.urandom(100_000))
            data = (mp / "f").read_bytes()
        remac(cipher, fs_home, {"features": list(features_for(32768))}, names=(BAK,))
        before = {n: (cipher / n).read_bytes() for n in (CONF, BAK)}
        for extra in ([], ["--foreground"], ["--read-only"]):
            assert_one_line_error(run_encfs("mount", *extra, str(cipher), str(mp), home=fs_home, timeout=60),
                                  "encfs.conf and encfs.conf.bak are both intact but disagree on the block size",
                                  "delete the wrong one")
            assert not is_mounted(mp)
        assert {n: (cipher / n).read_bytes() for n in (CONF, BAK)} == before
        (cipher / BAK).unlink()  # what the error says to do
        with Mount(cipher, mp, fs_home):
            assert (mp / "f").read_bytes() == data
        assert (cipher / BAK).read_bytes() == (cipher / CONF).read_bytes()


def test_a_verified_newer_copy_refuses_and_is_never_repaired(tmp_path: Path, fs_home: Path) -> None:
    """A future encfs upgrades the backup first: this encfs must not 'repair' it back."""
    cipher, mp = new_fs(tmp_path, fs_home)
    remac(cipher, fs_home, {"format": 3}, names=(BAK,))
    before = {n: (cipher / n).read_bytes() for n in (CONF, BAK)}
    with guard(cipher, mp):
        assert_one_line_error(run_encfs("mount", str(cipher), str(mp), home=fs_home, timeout=60),
                              "unsupported encfs filesystem format 3", "upgrade encfs")
        assert not is_mounted(mp)
    assert {n: (cipher / n).read_bytes() for n in (CONF, BAK)} == before


def test_info_reads_without_verifying(tmp_path: Path, fs_home: Path) -> None:
    cipher, _ = new_fs(tmp_path, fs_home)
    _flip(cipher / BAK, b'"format": 2', 10, 0)
    info = _info(cipher, fs_home)
    assert info["Verified"] is False and info["Format"] == 2
    assert info["Warnings"] == ["encfs.conf and encfs.conf.bak differ"]
    (cipher / CONF).unlink()
    info = _info(cipher, fs_home)
    assert info["Format"] == 3
    assert info["Warnings"] == ["encfs.conf is missing",
                                "encfs.conf.bak: unsupported encfs filesystem format 3 (this encfs reads 1 to 2): "
                                "upgrade encfs (or it is damaged: a mount verifies it)"]


# -- open_config on the session token (no mount) ---------------------------------------------------

def _fs(tmp_path: Path, service) -> Path:
    key = service.create_key()["KeyId"]
    cipher = tmp_path / "c"
    init_filesystem(cipher, service, key)
    return cipher


def test_open_config_of_a_new_filesystem(tmp_path: Path, service) -> None:
    cipher = _fs(tmp_path, service)
    before = {n: (cipher / n).read_bytes() for n in (CONF, BAK)}
    opened = open_config(cipher, service, writable=True)
    assert opened.config.format == FS_FORMAT == 2 and opened.warnings == []
    assert {n: (cipher / n).read_bytes() for n in (CONF, BAK)} == before  # nothing to write
    assert (cipher / "encfs.lock").exists()


@pytest.mark.parametrize("field", ["key_id", "fs_id", "wrapped_secret"])
def test_a_copy_whose_secret_does_not_unwrap_is_damaged(field: str, tmp_path: Path, service) -> None:
    cipher = _fs(tmp_path, service)
    d = _copy(cipher, BAK)
    value = d[field]
    d[field] = value[:8] + ("1" if value[8] == "0" else "0") + value[9:]
    (cipher / BAK).write_text(json.dumps(d))
    opened = open_config(cipher, service, writable=False)
    assert opened.warnings == [f"{BAK} is damaged (the filesystem key in it does not unwrap: "
                               f"{opened.warnings[0].split('unwrap: ', 1)[1]}"]
    assert _copy(cipher, BAK) == d
    opened = open_config(cipher, service, writable=True)
    assert opened.warnings[-1] == f"restored {BAK} from the good copy"
    assert (cipher / BAK).read_bytes() == (cipher / CONF).read_bytes()


def test_both_copies_failing_for_one_reason_report_that_reason(tmp_path: Path, service, token) -> None:
    """A wrong token (here: another key store) is not damage to the copies."""
    cipher = _fs(tmp_path, service)
    other = KeyService(tmp_path / "other-home", token)
    try:
        with pytest.raises(InvalidCiphertext, match="names key .*, which does not exist"):
            open_config(cipher, other, writable=True)
    finally:
        other.audit.close()
    assert _copy(cipher, CONF)["format"] == 2


def test_upgrade_uses_format_2_only_once_both_copies_are_written(tmp_path: Path, service) -> None:
    cipher = _fs(tmp_path, service)
    v1_body = {k: v for k, v in _copy(cipher, CONF).items() if k != "mac"} | {"format": 1}
    for name in (CONF, BAK):
        (cipher / name).write_text(json.dumps(v1_body, indent=1) + "\n")
    assert open_config(cipher, service, writable=False).config.format == 1
    blocker = cipher / f"{CONF}.tmp.{os.getpid()}"  # write_atomic's temporary name, taken: the primary
    blocker.mkdir()                                  # cannot be written (root ignores modes)
    try:
        opened = open_config(cipher, service, writable=True)
    finally:
        blocker.rmdir()
    assert opened.config.format == 1, "format 2 in use while encfs.conf still says 1"
    assert any(w.startswith("cannot upgrade the config to format 2 (encfs.conf:") for w in opened.warnings)
    assert _copy(cipher, BAK)["format"] == 2 and _copy(cipher, CONF)["format"] == 1
    opened = open_config(cipher, service, writable=True)  # the next mount finishes it
    assert opened.config.format == 2
    assert _copy(cipher, CONF) == _copy(cipher, BAK)
