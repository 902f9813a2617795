"""Lost or damaged filesystem metadata on real mounts (a config copy, a directory id, a long-name
side file), `encfs info`, and the content block size `encfs init` chooses.

Every test that mounts something runs inside ``guard(cipherdir, mountpoint)``
(fuse_cli_helpers.py), which leaves nothing mounted and no daemon behind.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from conftest import run_encfs
from fuse_cli_helpers import assert_one_line_error, backing_subdirs, encfs_ok, expect_errno, guard, new_fs
from fuse_helpers import Mount

from encfs.fuse.mount import is_mounted

# -- metadata loss ---------------------------------------------------------------------------------

def _info(cipher: Path, home: Path) -> dict:
    return json.loads(encfs_ok("info", "--json", str(cipher), home=home))


@pytest.mark.parametrize("damage", ["deleted", "garbage", "json-list", "empty-object", "truncated"])
def test_primary_config_lost_falls_back_to_backup(damage: str, tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        with Mount(cipher, mp, fs_home):
            (mp / "f").write_text("survives")
        conf = cipher / "encfs.conf"
        original = conf.read_bytes()
        if damage == "deleted":
            conf.unlink()
        else:
            conf.write_bytes({"garbage": os.urandom(300), "json-list": b"[1, 2]", "empty-object": b"{}",
                              "truncated": original[: len(original) // 2]}[damage])
        info = _info(cipher, fs_home)
        assert info["Format"] == 2
        assert len(info["Warnings"]) == 1 and info["Warnings"][0].startswith("encfs.conf is "), info["Warnings"]
        text = encfs_ok("info", str(cipher), home=fs_home)
        assert "encfs.conf is" in text
        with Mount(cipher, mp, fs_home):
            assert (mp / "f").read_text() == "survives"
        # a read-write mount restored the lost copy from the good one
        assert json.loads(conf.read_bytes()) == json.loads(original)
        assert _info(cipher, fs_home)["Warnings"] == []


@pytest.mark.parametrize("field", ["wrapped_secret", "fs_id"])
def test_primary_config_that_parses_but_does_not_unlock_falls_back(field: str, tmp_path: Path,
                                                                    fs_home: Path) -> None:
    """Damage `encfs info` cannot see (valid JSON, wrong bytes): the mount tries the other copy."""
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        with Mount(cipher, mp, fs_home):
            (mp / "f").write_text("survives")
        conf = cipher / "encfs.conf"
        original = conf.read_bytes()
        d = json.loads(original)
        value = d[field]
        i = len(value) // 2
        swapped = "1" if value[i] == "0" else "0"  # a digit is valid in both base64 and hex
        d[field] = value[:i] + swapped + value[i + 1:]
        conf.write_text(json.dumps(d))
        with Mount(cipher, mp, fs_home):
            assert (mp / "f").read_text() == "survives"
        assert json.loads(conf.read_bytes()) == json.loads(original)


def test_backup_config_lost_is_reported_and_restored(tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        (cipher / "encfs.conf.bak").unlink()
        assert _info(cipher, fs_home)["Warnings"] == ["encfs.conf.bak is missing"]
        with Mount(cipher, mp, fs_home, "--read-only"):
            pass
        assert not (cipher / "encfs.conf.bak").exists(), "a read-only mount wrote to the CIPHERDIR"
        with Mount(cipher, mp, fs_home):
            pass
        assert _info(cipher, fs_home)["Warnings"] == []


def test_both_config_copies_damaged_is_one_line(tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    (cipher / "encfs.conf").write_bytes(b"\x00" * 64)
    (cipher / "encfs.conf.bak").unlink()
    with guard(cipher, mp):
        assert_one_line_error(run_encfs("info", str(cipher), home=fs_home), "encfs.conf is damaged")
        assert_one_line_error(run_encfs("mount", str(cipher), str(mp), home=fs_home, timeout=30),
                              "encfs.conf is damaged", "encfs.conf.bak is missing")
        assert not is_mounted(mp)


def _tree_with_subdir(mp: Path) -> dict[str, bytes]:
    files = {"top": b"top level", "sub/one": b"1", "sub/two": b"2" * 5000, "sub/" + "N" * 230: b"long",
             "other/three": b"3"}
    (mp / "sub").mkdir()
    (mp / "other").mkdir()
    for name, data in files.items():
        (mp / name).write_bytes(data)
    return files


def _backing_dir_of(cipher: Path, mp: Path, name: str) -> Path:
    """The backing directory of plaintext directory ``name`` (matched by inode: encfs passes them through)."""
    ino = os.stat(mp / name).st_ino
    found = [p for p in backing_subdirs(cipher) if p.stat().st_ino == ino]
    assert len(found) == 1
    return found[0]


def test_lost_dirid_file_is_recovered_from_xattr(tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        with Mount(cipher, mp, fs_home):
            files = _tree_with_subdir(mp)
            sub = _backing_dir_of(cipher, mp, "sub")
        dirid = (sub / "encfs.dirid").read_bytes()
        assert os.getxattr(sub, "user.encfs.dirid") == dirid
        (sub / "encfs.dirid").unlink()
        with Mount(cipher, mp, fs_home):
            assert sorted(os.listdir(mp / "sub")) == sorted(n.split("/")[1] for n in files if n.startswith("sub/"))
            for name, data in files.items():
                assert (mp / name).read_bytes() == data
        # repaired, so a copy that drops xattrs (cp -r, rsync without -X) keeps the directory readable
        assert (sub / "encfs.dirid").read_bytes() == dirid


def test_lost_dirid_file_and_xattr_breaks_only_that_directory(tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        with Mount(cipher, mp, fs_home):
            files = _tree_with_subdir(mp)
            sub = _backing_dir_of(cipher, mp, "sub")
        (sub / "encfs.dirid").unlink()
        os.removexattr(sub, "user.encfs.dirid")
        with Mount(cipher, mp, fs_home):
            expect_errno(errno.EIO, os.listdir, mp / "sub")
            expect_errno(errno.EIO, (mp / "sub" / "one").read_bytes)
            expect_errno(errno.EIO, (mp / "sub" / "new").write_bytes, b"x")
            assert sorted(os.listdir(mp)) == ["other", "sub", "top"]
            assert os.listdir(mp / "other") == ["three"]
            assert (mp / "top").read_bytes() == files["top"]
            assert (mp / "other" / "three").read_bytes() == files["other/three"]
            (mp / "new").write_text("still writable")
            (mp / "other" / "newdir").mkdir()
            assert (mp / "new").read_text() == "still writable"
        assert not (sub / "encfs.dirid").exists(), "a new id was invented for a non-empty directory"


def test_lost_long_name_side_file_hides_only_that_entry(tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    long_a, long_b = "A" * 200, "B" * 210
    with guard(cipher, mp):
        with Mount(cipher, mp, fs_home):
            (mp / "d").mkdir()
            for name in (long_a, long_b, "short"):
                (mp / "d" / name).write_text(name[:1])
            d = _backing_dir_of(cipher, mp, "d")
        sides = sorted(d.glob("encfs.ln.*.name"))
        assert len(sides) == 2
        sides[0].unlink()
        with Mount(cipher, mp, fs_home):
            listed = os.listdir(mp / "d")
            assert "short" in listed and len(listed) == 2, listed
            survivor = next(n for n in listed if n != "short")
            lost = long_b if survivor == long_a else long_a
            assert (mp / "d" / survivor).read_text() == survivor[:1]
            assert (mp / "d" / "short").read_text() == "s"
            # the entry is not listed, but its name still reaches it (the hashed entry needs no side file)
            assert (mp / "d" / lost).read_text() == lost[:1]


# -- info ----------------------------------------------------------------------------------------------

def test_info_reports_format_ids_features_and_counts(tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    key_id = next(line.split()[1] for line in encfs_ok("key", "describe", "fs", home=fs_home).splitlines()
                  if line.startswith("KeyId"))
    with guard(cipher, mp):
        with Mount(cipher, mp, fs_home):
            (mp / "f1").write_text("1")
            (mp / "d1").mkdir()
            (mp / "d1" / "d2").mkdir()
            (mp / "d1" / "f2").write_text("2")
            (mp / "d1" / ("F" * 240)).write_text("3")
            os.symlink("f1", mp / "s1")
            os.symlink("x" * 3000, mp / "d1" / "s2")  # a long target, stored beside the tree
        info = _info(cipher, fs_home)
    conf = json.loads((cipher / "encfs.conf").read_bytes())
    assert info["Format"] == 2 and info["Verified"] is False
    assert info["Lock"] == "not mounted (last unmounted cleanly)"
    assert info["FileSystemId"] == conf["fs_id"] and len(info["FileSystemId"]) == 32
    assert info["KeyId"] == key_id
    assert info["Features"] == conf["features"]
    assert {"aes256gcm-4k-blocks", "per-file-keys", "siv-names", "long-names"} <= set(info["Features"])
    assert "aes256gcm-32k-blocks" not in info["Features"] and info["BlockSize"] == 4096
    counts = info["Counts"]
    assert (counts["Files"], counts["Directories"], counts["Symlinks"]) == (3, 2, 2), counts
    assert counts["LongNames"] == 1
    assert info["Warnings"] == []
    text = encfs_ok("info", str(cipher), home=fs_home)
    assert info["FileSystemId"] in text and key_id in text and "siv-names" in text
    assert any(line.split() == ["format", "2"] for line in text.splitlines()), text
    assert any(line.startswith("verified   no ") for line in text.splitlines()), text
    assert_one_line_error(run_encfs("info", str(tmp_path), home=fs_home), "not an encfs filesystem")


def test_info_of_a_mountpoint_is_info_of_its_cipherdir(tmp_path: Path, fs_home: Path) -> None:
    cipher, mp = new_fs(tmp_path, fs_home)
    with guard(cipher, mp):
        with Mount(cipher, mp, fs_home):
            by_mp, by_dir = _info(mp, fs_home), _info(cipher, fs_home)
            text = encfs_ok("info", str(mp), home=fs_home)
        assert by_mp["CipherDir"] == str(cipher) and by_mp["MountPoint"] == str(mp)
        assert by_mp["FileSystemId"] == by_dir["FileSystemId"] and by_mp["Lock"].startswith("mounted read-write")
        assert any(line.split() == ["mountpoint", str(mp)] for line in text.splitlines()), text
        assert_one_line_error(run_encfs("info", str(mp), home=fs_home), "not an encfs filesystem")


# -- content block size --------------------------------------------------------------------------------

def test_init_block_size_4096_and_32768(tmp_path: Path, fs_home: Path) -> None:
    """Both block sizes mount and hold the same data; the backing file has that size's framing."""
    data = os.urandom(3 * 32768 + 5000)
    for block in (4096, 32768):
        cipher, mp = tmp_path / f"c{block}", tmp_path / f"p{block}"
        mp.mkdir()
        out = encfs_ok("init", str(cipher), "--key", "fs", "--block-size", str(block), home=fs_home)
        assert f"({block // 1024} KiB blocks)" in out
        with guard(cipher, mp):
            with Mount(cipher, mp, fs_home):
                (mp / "f").write_bytes(data)
            with Mount(cipher, mp, fs_home):
                assert (mp / "f").read_bytes() == data
        info = _info(cipher, fs_home)
        assert info["BlockSize"] == block
        assert f"aes256gcm-{block // 1024}k-blocks" in info["Features"]
        backing = [p for p in cipher.iterdir() if "." not in p.name]
        full, rest = divmod(len(data), block)
        assert [p.stat().st_size for p in backing] == [128 + full * (block + 28) + rest + 28]


def test_init_refuses_other_block_sizes(tmp_path: Path, fs_home: Path) -> None:
    proc = run_encfs("init", str(tmp_path / "c"), "--key", "fs", "--block-size", "8192", home=fs_home)
    assert proc.returncode != 0 and b"--block-size" in proc.stderr
    assert not (tmp_path / "c").exists()
