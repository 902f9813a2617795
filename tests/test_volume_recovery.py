"""Volume recovery keys (issue #23) through the real CLI: a second wrapping of the volume key, in the
header's recovery record, that attaches the volume without the HSM (real token, loop devices, FUSE).

The ways in: `volume create --new-recovery-key|--recovery-key`, `recovery-key add`,
`recovery-key remove`, `volume attach --recovery-key` (no token: a home without one),
`encfs rekey VOL --key NEW --recovery-key FILE` (off a lost CMK), `volume rekey` (full: refused
without the file, re-wrapped with it), `snapshot restore` (the new volume has none). Few CLI calls
and 8 MiB sparse volumes: the three tests take about 15 s.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import replace
from pathlib import Path

import pytest
from volume_helpers import Rig, dd_write, patterns, pytestmark, read_ok, rig  # noqa: F401 - rig is a fixture

from encfs.block.header import RECORD, RECOVERY_KEY, header_mac_key
from encfs.block.layout import header_offset
from encfs.block.recovery import WrongRecoveryKey, open_record
from encfs.block.volume import create_volume, read_volume_header
from encfs.keys.service import KeyService


def _create(rig: Rig, name: str, *options: str | Path, key: str = "fs") -> Path:  # noqa: F811
    image = rig.tmp / name
    rig.ok("volume", "create", image, "--size", "8M", "--key", key, "--sparse", *options)
    return image


def _no_token(rig: Rig) -> Path:  # noqa: F811
    """A home where the token is gone: an empty state directory."""
    home = rig.tmp / "no-token"
    home.mkdir(exist_ok=True)
    return home


def _attach_rk(rig: Rig, image: Path, rk: Path, *more: str) -> str:  # noqa: F811
    return rig.attach_with(image, "--recovery-key", str(rk), *more, home=_no_token(rig))


def test_create_with_a_recovery_key_attaches_without_the_token(rig: Rig) -> None:  # noqa: F811
    rk = rig.tmp / "vol.rk"
    image = _create(rig, "vol.img", "--new-recovery-key", rk)
    assert os.stat(rk).st_mode & 0o777 == 0o600 and len(bytes.fromhex(rk.read_text().strip())) == 32
    assert rig.info(image)["RecoveryKey"] is True  # read without the token
    checked = json.loads(rig.ok("volume", "info", image, "--recovery-key", rk, "--json", home=_no_token(rig)))
    assert checked["HeaderVerified"] is True and checked["RecoveryKey"] is True
    # An existing file is never replaced, and nothing is created then.
    before = rk.read_bytes()
    assert "never replaces" in rig.fails("volume", "create", rig.tmp / "b.img", "--size", "8M", "--key", "fs",
                                         "--new-recovery-key", rk)
    assert rk.read_bytes() == before and not (rig.tmp / "b.img").exists()
    # A failed create removes the recovery key file it made.
    assert rig.fails("volume", "create", rig.tmp / "c.img", "--size", "8M", "--key", "no-such-key",
                     "--new-recovery-key", rig.tmp / "c.rk")
    assert not (rig.tmp / "c.rk").exists() and not (rig.tmp / "c.img").exists()

    # Without the token (a home that has none, a PKCS#11 module that does not exist; no PIN asked),
    # read-write; the daemon has no PKCS#11 library mapped.
    loop = _attach_rk(rig, image, rk, "--pkcs11-module", str(rig.tmp / "no-such-pkcs11.so"))
    [daemon] = [r["Pid"] for r in rig.listed() if r["Device"] == loop]
    assert "softhsm" not in Path(f"/proc/{daemon}/maps").read_text()
    dd_write(loop, 0, patterns(0, 4, 1), rig.tmp)
    rig.detach(loop)
    # What it wrote, and its header (MAC, nonce reservation), open with the HSM as before.
    loop = rig.attach(image)
    [daemon] = [r["Pid"] for r in rig.listed() if r["Device"] == loop]
    assert "softhsm" in Path(f"/proc/{daemon}/maps").read_text()  # the check above can fail
    assert read_ok(loop, 0, 4 * 4096) == patterns(0, 4, 1)
    rig.detach(loop)

    wrong = rig.tmp / "wrong.rk"
    wrong.write_text(secrets.token_hex(32) + "\n")
    wrong.chmod(0o600)  # else a warning line too
    p = rig.encfs("volume", "attach", image, "--recovery-key", wrong, home=_no_token(rig))
    assert p.returncode == 77, p.stderr
    assert p.stderr.strip().splitlines() == [
        f"encfs: the recovery key does not open volume {image} (another volume's, or an old one?)"]
    assert "--key names the CMK" in rig.fails("volume", "attach", image, "--recovery-key", rk, "--key", "fs")
    rig.assert_nothing_attached()


def _records(image: Path) -> list[bytes]:
    with open(image, "rb") as f:
        out = []
        for copy in (0, 1):
            f.seek(header_offset(copy))
            out.append(f.read(RECORD))
        return out


def _write_records(image: Path, records: list[bytes]) -> None:
    with open(image, "r+b") as f:
        for copy, record in enumerate(records):
            f.seek(header_offset(copy))
            f.write(record)


def test_add_remove_and_restore(rig: Rig) -> None:  # noqa: F811
    image = _create(rig, "vol.img")
    rk = rig.tmp / "vol.rk"
    assert rig.info(image)["RecoveryKey"] is False
    rig.ok("recovery-key", "add", image, "--new-recovery-key", rk)
    assert rig.info(image)["RecoveryKey"] is True
    assert "already has a recovery key" in rig.fails("recovery-key", "add", image, "--recovery-key", rk)
    with_key = _records(image)

    # The record is under the header MAC: stripping it (flag and record, checksum recomputed) is
    # damage to a holder of the volume key, not a volume without a recovery key.
    stripped = []
    for r in with_key:
        body = bytearray(r[:4064])
        body[5] &= ~0x04
        body[3948:4008] = bytes(60)
        stripped.append(bytes(body) + hashlib.sha256(bytes(body)).digest())
    _write_records(image, stripped)
    assert "no volume header copy authenticates" in rig.fails("volume", "info", image, "--key", "fs")
    _write_records(image, with_key)

    # A restored volume has a fresh volume key, and no recovery key (the command says so).
    sid = json.loads(rig.ok("snapshot", "create", image, "--json"))["SnapshotId"]
    new = rig.tmp / "restored.img"
    out = rig.ok("snapshot", "restore", f"{image}@{sid}", new)
    assert "recovery key does not open it" in out and "recovery-key add" in out
    assert rig.info(new)["RecoveryKey"] is False

    rig.ok("recovery-key", "remove", image)
    assert rig.info(image)["RecoveryKey"] is False
    line = rig.fails("volume", "attach", image, "--recovery-key", rk, home=_no_token(rig))
    assert line == f"encfs: volume {image.absolute()} has no recovery key"
    # An existing key file can be given again; and removal with the recovery key alone (no token).
    rig.ok("recovery-key", "add", image, "--recovery-key", rk)
    rig.ok("recovery-key", "remove", image, "--recovery-key", rk, home=_no_token(rig))
    assert rig.info(image)["RecoveryKey"] is False
    # Removing it does not revoke a copy of the image taken before (documented): it still verifies.
    _write_records(image, with_key)
    assert json.loads(rig.ok("volume", "info", image, "--key", "fs", "--json"))["RecoveryKey"] is True
    rig.assert_nothing_attached()


def test_recovery_key_moves_the_volume_off_a_lost_cmk_and_through_a_full_rekey(rig: Rig) -> None:  # noqa: F811
    alias = f"lost-{secrets.token_hex(4)}"
    rig.ok("key", "create", "--alias", alias)
    rk = rig.tmp / "vol.rk"
    image = _create(rig, "vol.img", "--new-recovery-key", rk, key=alias)
    lost = rig.info(image)
    loop = rig.attach(image)
    dd_write(loop, 8192, patterns(2, 3, 7), rig.tmp)
    rig.detach(loop)
    rig.ok("key", "disable", alias)
    assert "disabled" in rig.fails("volume", "info", image, "--key", alias).lower()

    # Re-wrap: the volume key from the recovery record, wrapped under the new CMK.
    assert "re-wrapped the volume key" in rig.ok("rekey", image, "--key", "fs", "--recovery-key", rk)
    moved = json.loads(rig.ok("volume", "info", image, "--key", "fs", "--json"))
    assert moved["KeyId"] != lost["KeyId"] and moved["VolumeId"] == lost["VolumeId"]

    # A full re-key (a fresh volume key) needs the file, else the record would open only the old key.
    for cmd in (("volume", "rekey", image), ("rekey", image, "--full")):
        line = rig.fails(*cmd)
        assert "has a recovery key" in line and "--recovery-key FILE" in line, line
    wrong = rig.tmp / "wrong.rk"
    wrong.write_text(secrets.token_hex(32) + "\n")
    wrong.chmod(0o600)  # else a warning line too
    p = rig.encfs("volume", "rekey", image, "--recovery-key", wrong)
    assert p.returncode == 77, p.stderr
    assert rig.info(image)["VolumeId"] == lost["VolumeId"]
    rig.ok("volume", "rekey", image, "--recovery-key", rk)
    info = rig.info(image)
    assert info["VolumeId"] != lost["VolumeId"] and info["RecoveryKey"] is True

    # The recovery key opens the new volume key; the HSM opens it too.
    loop = _attach_rk(rig, image, rk, "--read-only")
    assert read_ok(loop, 8192, 3 * 4096) == patterns(2, 3, 7)
    rig.detach(loop)
    loop = rig.attach(image)
    assert read_ok(loop, 8192, 3 * 4096) == patterns(2, 3, 7)
    rig.detach(loop)
    rig.assert_nothing_attached()


def test_a_header_write_cut_between_the_copies_loses_to_the_other_copy(tmp_path: Path, service: KeyService) -> None:
    """An add or remove cut by a crash between copy 0 and copy 1 (in process: no CLI, no loop device):
    the copy that opens wins with a warning about the other, whichever way the volume is opened."""
    path, rk = tmp_path / "v.img", secrets.token_bytes(32)
    made = create_volume(path, 8 << 20, service, service.create_key()["KeyId"], recovery_key=rk)
    key = open_record(made, rk, path)
    mac_key = header_mac_key(key, made.volume_id)
    without = replace(made, seq=made.seq + 1, flags=made.flags & ~RECOVERY_KEY, recovery=b"")
    _write_records(path, [without.pack(mac_key), made.pack(mac_key)])  # a remove cut after copy 0
    header, warnings = read_volume_header(path, recovery_key=rk)
    assert header.has_recovery_key and header.seq == made.seq
    assert warnings == [f"header copy 0: its volume key does not unwrap (volume {path} has no recovery key)"]
    header, warnings = read_volume_header(path, service)
    assert header == replace(without, mac=header.mac) and warnings == []  # with the HSM: the newer copy
    _write_records(path, [replace(made, seq=made.seq + 1).pack(mac_key), made.pack(mac_key)])
    with pytest.raises(WrongRecoveryKey) as e:  # both copies say the same: the reason, not damage
        read_volume_header(path, recovery_key=bytes(32))
    assert e.value.exit_code == 77
