"""A filesystem's recovery key (issue #23, docs/FORMAT.md §6.10), through the real CLI, a real
token and real FUSE mounts: set at init or added later (every file re-keyed so that the key
opens it), a read-only mount by the recovery key alone with the CMK disabled and no token at
all, a wrong key refused in one line (exit 77), `encfs info`, and removal."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import init_home, run_encfs
from fuse_helpers import Mount

BIG = os.urandom((1 << 20) + 12345)  # several 32 KiB blocks and a short last one


def ok(*args: str, home: Path) -> str:
    proc = run_encfs(*args, home=home)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def new_key(home: Path) -> str:
    """A CMK of this test alone (it gets disabled)."""
    return str(json.loads(ok("key", "create", "--json", home=home))["KeyId"])


def fill(cipherdir: Path, plain: Path, home: Path, name: str = "big") -> None:
    with Mount(cipherdir, plain, home):
        (plain / name).write_bytes(BIG)
        (plain / "d").mkdir(exist_ok=True)
        (plain / "d" / f"{name}-small").write_bytes(b"small " + name.encode())
        os.symlink(f"d/{name}-small", plain / f"{name}-link")
        os.setxattr(plain / name, "user.note", b"kept")


def check(plain: Path, name: str = "big") -> None:
    assert (plain / name).read_bytes() == BIG
    assert (plain / "d" / f"{name}-small").read_bytes() == b"small " + name.encode()
    assert os.readlink(plain / f"{name}-link") == f"d/{name}-small"
    assert os.getxattr(plain / name, "user.note") == b"kept"


def recovery_mount(cipherdir: Path, plain: Path, key_file: Path, no_token: Path) -> Mount:
    """A mount by the recovery key from a home with no key store at all."""
    return Mount(cipherdir, plain, no_token, "--recovery-key", str(key_file))


def info(cipherdir: Path, home: Path) -> dict[str, object]:
    result: dict[str, object] = json.loads(ok("info", str(cipherdir), "--json", home=home))
    return result


def test_init_with_a_recovery_key_mounts_read_only_without_the_token(tmp_path: Path, fs_home: Path) -> None:
    cipherdir, plain, no_token = tmp_path / "cipher", tmp_path / "plain", tmp_path / "no-token"
    plain.mkdir()
    key, rk = new_key(fs_home), tmp_path / "fs.rk"
    # Wrapped keys derived from R: the move by the recovery key below has a header per file to move.
    out = ok("init", str(cipherdir), "--key", key, "--new-recovery-key", str(rk), "--wrapped-file-keys",
             home=fs_home)
    assert "recovery key" in out and oct(rk.stat().st_mode & 0o777) == "0o600"
    assert len(rk.read_text().strip()) == 64
    fill(cipherdir, plain, fs_home)
    assert info(cipherdir, fs_home)["Recovery"] is True

    ok("key", "disable", key, home=fs_home)  # the HSM no longer opens it...
    proc = run_encfs("mount", str(cipherdir), str(plain), home=fs_home)
    assert proc.returncode != 0 and b"disabled" in proc.stderr
    m = recovery_mount(cipherdir, plain, rk, no_token)  # ...the recovery key does, without a token
    try:
        check(plain)
        with pytest.raises(OSError) as e:
            (plain / "new").write_bytes(b"x")
        assert e.value.errno == errno.EROFS
        with open(f"/proc/{m.pid}/maps") as maps:  # no PKCS#11 module was loaded
            assert "softhsm" not in maps.read().lower()
    finally:
        m.stop()
    assert not (no_token / "softhsm").exists()

    wrong = tmp_path / "wrong.rk"
    wrong.write_text(os.urandom(32).hex() + "\n")
    wrong.chmod(0o600)  # else a warning line too
    proc = run_encfs("mount", str(cipherdir), str(plain), "--recovery-key", str(wrong), home=no_token)
    lines = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 77 and len(lines) == 1 and "wrong recovery key" in lines[0], proc.stderr
    assert lines[0].startswith("encfs: ") and rk.read_text().strip() not in proc.stderr.decode()

    # The HSM is lost for good: a new key store and CMK take the filesystem over by the recovery key.
    new_home = init_home(tmp_path / "new-home")
    new_cmk = new_key(new_home)
    moved = json.loads(ok("rekey", str(cipherdir), "--key", new_cmk, "--recovery-key", str(rk), "--json",
                          home=new_home))
    assert moved["Files"] == 2 and moved["KeyId"] == new_cmk and moved["Damaged"] == []
    with Mount(cipherdir, plain, new_home):  # read-write, under the new CMK
        check(plain)
        (plain / "new").write_bytes(b"written under the new CMK")
        assert (plain / "new").read_bytes() == b"written under the new CMK"


def test_add_converts_every_file_and_remove_drops_it(tmp_path: Path, fs_home: Path) -> None:
    cipherdir, plain, no_token = tmp_path / "cipher", tmp_path / "plain", tmp_path / "no-token"
    plain.mkdir()
    key, rk = new_key(fs_home), tmp_path / "fs.rk"
    ok("init", str(cipherdir), "--key", key, "--wrapped-file-keys", home=fs_home)
    fill(cipherdir, plain, fs_home)  # random file keys: no recovery key could open them
    before = (cipherdir / "encfs.conf").read_bytes()

    out = json.loads(ok("recovery-key", "add", str(cipherdir), "--new-recovery-key", str(rk), "--json",
                        home=fs_home))
    assert out["Files"] == 2 and out["RecoveryKey"] is True  # big and d/big-small, each given a derived key
    assert not (cipherdir / "encfs.rekey").exists()
    assert json.loads(ok("recovery-key", "add", str(cipherdir), "--recovery-key", str(rk), "--json",
                         home=fs_home))["AlreadySet"] is True
    # A run killed between the two config copies (the backup is written first) leaves the re-key
    # marker and a primary copy without the recovery key: mounts wait, and `add` finishes the job.
    marker = {"version": 1, "operation": "full", "key_id": key, "recovering": False, "adding": True}
    (cipherdir / "encfs.rekey").write_text(json.dumps(marker) + "\n")
    (cipherdir / "encfs.conf").write_bytes(before)
    proc = run_encfs("mount", str(cipherdir), str(plain), home=fs_home)
    assert proc.returncode != 0 and b"interrupted" in proc.stderr
    again = json.loads(ok("recovery-key", "add", str(cipherdir), "--recovery-key", str(rk), "--json", home=fs_home))
    assert again["Resumed"] is True and again["Files"] == 2 and not (cipherdir / "encfs.rekey").exists()
    assert (cipherdir / "encfs.conf").read_bytes() == (cipherdir / "encfs.conf.bak").read_bytes()
    fill(cipherdir, plain, fs_home, "after")  # new files get derived keys from the start

    shutil.move(fs_home / "softhsm", tmp_path / "token-away")  # the token directory is gone
    try:
        m = recovery_mount(cipherdir, plain, rk, fs_home)
        try:
            check(plain)
            check(plain, "after")
        finally:
            m.stop()
    finally:
        shutil.move(tmp_path / "token-away", fs_home / "softhsm")

    assert "removed" in ok("recovery-key", "remove", str(cipherdir), home=fs_home)
    assert info(cipherdir, fs_home)["Recovery"] is False
    proc = run_encfs("mount", str(cipherdir), str(plain), "--recovery-key", str(rk), home=no_token)
    assert proc.returncode == 1 and b"has no recovery key" in proc.stderr
    with Mount(cipherdir, plain, fs_home):  # the HSM still opens everything
        check(plain)
        check(plain, "after")


def test_recovery_key_names_a_cipherdir_or_an_image_and_nothing_else(tmp_path: Path, fs_home: Path) -> None:
    """`encfs recovery-key` takes a CIPHERDIR or a volume image: anything else, and removing a
    filesystem's key by the key itself (a volume's only), are one line each."""
    missing = run_encfs("recovery-key", "add", str(tmp_path / "nothing"), "--new-recovery-key",
                        str(tmp_path / "rk"), home=fs_home)
    assert missing.returncode == 1 and missing.stderr.decode().strip() == \
        f"encfs: {tmp_path / 'nothing'}: no such CIPHERDIR or volume image", missing.stderr
    assert not (tmp_path / "rk").exists()
    cipherdir = tmp_path / "c"
    ok("init", str(cipherdir), "--key", "fs", home=fs_home)
    by_key = run_encfs("recovery-key", "remove", str(cipherdir), "--recovery-key", str(tmp_path / "rk"), home=fs_home)
    assert by_key.returncode == 2 and by_key.stderr.count(b"\n") == 1 and b"with the HSM" in by_key.stderr, by_key.stderr


def test_a_file_the_recovery_key_would_not_open_is_logged_by_a_normal_mount(tmp_path: Path, fs_home: Path) -> None:
    """A backing file put back from before `recovery-key add` (a random key, wrapped by the CMK) reads
    as always through the CMK, and the mount logs that the recovery key does not open it."""
    cipherdir, plain, log = tmp_path / "cipher", tmp_path / "plain", tmp_path / "mount.log"
    plain.mkdir()
    ok("init", str(cipherdir), "--key", "fs", "--wrapped-file-keys", home=fs_home)  # random keys before `add`
    with Mount(cipherdir, plain, fs_home):
        (plain / "old").write_bytes(b"written before the recovery key")
        (plain / "new").write_bytes(b"converted by add")
    [old_backing] = [p for p in cipherdir.iterdir() if p.is_file() and not p.name.startswith("encfs")
                     and p.stat().st_size == max(q.stat().st_size for q in cipherdir.iterdir()
                                                 if q.is_file() and not q.name.startswith("encfs"))]
    saved = tmp_path / "saved"
    shutil.copy2(old_backing, saved)  # with its state xattr
    ok("recovery-key", "add", str(cipherdir), "--new-recovery-key", str(tmp_path / "rk"), home=fs_home)
    shutil.copy2(saved, old_backing)
    with Mount(cipherdir, plain, fs_home, "--log-file", str(log)):
        assert (plain / "old").read_bytes() == b"written before the recovery key"
        assert (plain / "new").read_bytes() == b"converted by add"
    text = log.read_text()
    assert "'/old': its data key is not derived from the recovery root" in text, text
    assert "'/new'" not in text, text
    report = json.loads(run_encfs("fsck", str(cipherdir), "--json", home=fs_home).stdout)  # and fsck says so
    found = [f for f in report["Damage"] if f["Kind"] == "recovery"]
    assert len(found) == 1 and found[0]["Severity"] == "warning" and "/old" in found[0]["Message"], report
