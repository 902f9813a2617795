"""The authenticated volume header (flag HEADER_MAC) and the volume key's seal budget (issue #19 items 4
and 2), through open_volume() on plain image files with a real SoftHSM2 token: no FUSE, no loop device.

- A volume made by the release before (tests/data/vol-v1.tar.gz) is upgraded in place by its first open.
- A header copy whose MAC fails, or whose HEADER_MAC was cleared, is damaged; the other copy wins.
- ``expected_key`` pins the CMK; a volume under another CMK is refused in one line.
- Every seal is counted; the reservation is written before the seals it allows and survives a crash;
  the thresholds (lowered here) warn, then refuse sector writes with ENOSPC.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_encfs
from releases import extract_release
from volume_helpers import rechecksum

from encfs.block import budget
from encfs.block.cli import _info
from encfs.block.header import (
    HEADER_MAC,
    MAPS_MIRRORED,
    RECORD,
    VolumeFormatError,
    VolumeHeader,
    VolumeKeyMismatch,
)
from encfs.block.layout import SECTOR_SIZE, header_offset
from encfs.block.volume import create_volume, open_volume
from encfs.errors import InvalidCiphertext
from encfs.keys.service import KeyService

PATTERN = bytes((7 * i + 3) % 251 for i in range(12288))
HELLO = b"hello from encfs volume format 1\n"


# -- helpers ------------------------------------------------------------------------------------------


def _record(path: Path, copy: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), RECORD, header_offset(copy))


def _put(path: Path, copy: int, record: bytes) -> None:
    with open(path, "r+b") as f:
        os.pwrite(f.fileno(), record, header_offset(copy))


def _edit(path: Path, copy: int, offset: int, value: bytes) -> None:
    record = bytearray(_record(path, copy))
    record[offset:offset + len(value)] = value
    _put(path, copy, rechecksum(record))


def _headers(path: Path) -> list[VolumeHeader]:
    return [VolumeHeader.parse(_record(path, copy)) for copy in (0, 1)]


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    """The directory holding the ENCFS_HOME (``home``) and volume image (``vol.img``) that the release
    before header MACs made. Its token is used in subprocesses only: SoftHSM2 takes one token
    directory per process, and this process has the test token."""
    root = tmp_path / "v1"
    extract_release("vol-v1.tar.gz", root)
    return root


# Opens the v1 volume (pinned to its CMK, alias "vol"), optionally writes one sector, and reports.
OPEN_V1 = """
import json, logging, sys
from pathlib import Path
from encfs.block.header import RECORD, VolumeHeader, header_mac_key
from encfs.block.volume import open_volume
from encfs.errors import InvalidCiphertext
from encfs.keys.service import KeyService
logging.basicConfig(level=logging.INFO, format="%(message)s")
home, path, write = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "write"
with KeyService.open(home) as ks:
    vol = open_volume(path, ks, expected_key="vol")
    try:
        h = vol.header
        out = {"pattern": vol.read(0, 12288) == bytes((7 * i + 3) % 251 for i in range(12288)),
               "hello": bytes(vol.read(819200, 33)).decode(), "seals": vol.seals, "warnings": vol.warnings}
        if write:
            vol.write(100 * 4096, b"x" * 4096)
            vol.flush()
    finally:
        vol.close()
    key = ks.decrypt(h.wrapped_key, h.context()).plaintext
    try:
        ks.decrypt(h.wrapped_key, {"encfs:volume": h.volume_id.hex()})
        out["old_context_opens"] = True
    except InvalidCiphertext:
        out["old_context_opens"] = False
    with open(path, "rb") as f:
        copies = [VolumeHeader.parse(f.read(RECORD)), VolumeHeader.parse((f.seek(65536), f.read(RECORD))[1])]
    out["copies"] = [[c.flags, c.seq, c.seals_reserved, c.verify(header_mac_key(key, c.volume_id))] for c in copies]
print(json.dumps(out))
"""


def _open_v1(root: Path, write: bool = False) -> tuple[dict, str]:
    env = dict(os.environ, ENCFS_HOME=str(root / "home"))
    env.pop("SOFTHSM2_CONF", None)
    p = subprocess.run([sys.executable, "-c", OPEN_V1, str(root / "home"), str(root / "vol.img"),
                        "write" if write else "read"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout), p.stderr


def _info_json(root: Path, *options: str) -> dict:
    p = run_encfs("volume", "info", "--json", *options, str(root / "vol.img"), home=root / "home")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.fixture
def volume(tmp_path: Path, service: KeyService) -> Path:
    path = tmp_path / "v.img"
    create_volume(path, 64 << 20, service, service.create_key()["KeyId"], version=1)  # format 1: its budget
    return path


# -- the upgrade of a volume made by the release before ------------------------------------------------


def test_a_volume_of_the_previous_release_is_upgraded_by_its_first_open(v1: Path) -> None:
    path = v1 / "vol.img"
    before = _headers(path)
    assert [h.flags for h in before] == [MAPS_MIRRORED] * 2 and before[0] == before[1]
    info = _info_json(v1)
    assert (info["HeaderMac"], info["HeaderVerified"], info["SealsReserved"]) == (False, False, None)

    out, log = _open_v1(v1)
    assert out["pattern"] and out["hello"] == HELLO.decode() and out["warnings"] == []
    estimate = out["seals"]
    assert estimate >= 6  # at least the sealed blocks in the image: 4 sectors, 2 maps
    assert f"header authenticated (volume upgraded; seal count estimated at {estimate})" in log
    # the key was re-wrapped with the marked context: a header whose flag is cleared does not unwrap
    assert out["old_context_opens"] is False
    # both copies authenticated, with the exact count (a clean close settles the reservation)
    assert out["copies"] == [[MAPS_MIRRORED | HEADER_MAC, 2, estimate, True]] * 2
    after = _headers(path)
    assert after[0].context() == {"encfs:volume": before[0].volume_id.hex(), "encfs:header": "mac-v1"}
    info = _info_json(v1, "--key", "vol")
    assert (info["HeaderMac"], info["HeaderVerified"], info["SealsReserved"]) == (True, True, estimate)
    assert info["Warnings"] == []

    out, log = _open_v1(v1, write=True)  # a second open upgrades nothing; one sector + its map's 2 seals
    assert out["pattern"] and "upgraded" not in log
    assert [c[2] for c in _open_v1(v1)[0]["copies"]] == [estimate + 3] * 2


def test_an_upgrade_interrupted_between_the_copies_opens_from_the_upgraded_copy(v1: Path) -> None:
    path = v1 / "vol.img"
    old = _record(path, 1)
    _open_v1(v1)
    _put(path, 1, old)  # the crash: copy 0 written and synced, copy 1 not yet
    info = _info_json(v1)
    assert info["HeaderMac"] is True and "older header without a MAC" in info["Warnings"][0], info
    out, _log = _open_v1(v1, write=True)  # the write's reservation writes both copies again
    assert out["pattern"] and len(out["warnings"]) == 1 and "header copy 1" in out["warnings"][0]
    assert [c[0] for c in out["copies"]] == [MAPS_MIRRORED | HEADER_MAC] * 2 and out["copies"][1][3]


def test_an_upgrade_torn_in_copy_0_opens_from_the_old_copy_and_upgrades_again(v1: Path) -> None:
    path = v1 / "vol.img"
    record = bytearray(_record(path, 0))  # copy 0 torn: its checksum fails
    record[200] ^= 1
    _put(path, 0, bytes(record))
    out, log = _open_v1(v1)
    assert out["hello"] == HELLO.decode() and "header copy 0: volume header checksum mismatch" in out["warnings"]
    assert "volume upgraded" in log and [c[3] for c in out["copies"]] == [True, True]


# -- authentication and pinning ---------------------------------------------------------------------


@pytest.mark.parametrize("field,offset,value", [("size", 32, (128 << 20).to_bytes(8, "big")),
                                                ("seq", 8, (99).to_bytes(8, "big")),
                                                ("seals reserved", 4024, bytes(8))])
def test_a_copy_edited_without_the_key_is_damaged_and_the_other_wins(volume: Path, service: KeyService,
                                                                     field: str, offset: int, value: bytes) -> None:
    _edit(volume, 0, offset, value)
    assert VolumeHeader.parse(_record(volume, 0))  # the checksum alone accepts the forgery
    vol = open_volume(volume, service)
    try:
        assert vol.header.size == 64 << 20 and vol.header.seq == 1
        assert vol.warnings == ["header copy 0: MAC mismatch (tampered or damaged)"], field
    finally:
        vol.close()
    _edit(volume, 0, offset, value)
    _edit(volume, 1, offset, value)
    with pytest.raises(VolumeFormatError, match="no volume header copy authenticates") as e:
        open_volume(volume, service)
    assert "\n" not in e.value.message


def test_clearing_the_mac_flag_does_not_give_an_unauthenticated_header(volume: Path, service: KeyService) -> None:
    """The downgrade: HEADER_MAC cleared, size changed, checksum recomputed. The key was wrapped with
    the marked context, so such a copy does not unwrap; and it never wins over a copy with the flag."""
    flags = bytes([MAPS_MIRRORED])
    _edit(volume, 1, 5, flags)
    _edit(volume, 1, 8, (7).to_bytes(8, "big"))  # a newer sequence, to win
    _edit(volume, 1, 32, (128 << 20).to_bytes(8, "big"))
    vol = open_volume(volume, service)
    try:
        assert vol.header.authenticated and vol.header.size == 64 << 20
        assert len(vol.warnings) == 1 and "header copy 1: its volume key does not unwrap" in vol.warnings[0]
    finally:
        vol.close()
    for copy in (0, 1):
        _edit(volume, copy, 5, flags)
    with pytest.raises(InvalidCiphertext, match="encryption context does not match"):
        open_volume(volume, service)


def test_the_expected_key_pins_the_cmk(volume: Path, service: KeyService) -> None:
    header = _headers(volume)[0]
    other = service.create_key(alias="other")["KeyId"]
    with pytest.raises(VolumeKeyMismatch) as e:
        open_volume(volume, service, expected_key="other")
    assert e.value.message == f"volume {volume} is encrypted under key {header.key_id}, not other"
    open_volume(volume, service, expected_key=header.key_id).close()
    # a copy naming another CMK (a forged key id and blob) is damage, whatever --key says
    _edit(volume, 0, 4008, bytes.fromhex(other.replace("-", "")))
    with pytest.raises(VolumeFormatError):
        VolumeHeader.parse(_record(volume, 0))


# -- the seal budget (thresholds lowered) ---------------------------------------------------------------


@pytest.fixture
def small_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(budget, "RESERVE_STEP", 8)
    monkeypatch.setattr(budget, "SEAL_WARN", 40)
    monkeypatch.setattr(budget, "SEAL_REFUSE", 60)
    monkeypatch.setattr(budget, "SEAL_MAX", 70)


def test_every_seal_is_counted_and_a_clean_close_persists_the_count(volume: Path, service: KeyService) -> None:
    assert _headers(volume)[0].seals_reserved == 4  # create: both map slots of the 2 extents
    vol = open_volume(volume, service)
    try:
        vol.write(0, os.urandom(10 * SECTOR_SIZE))
        vol.flush()  # 1 extent dirty: its map sealed for the commit and the mirror slots
        assert vol.seals == 4 + 10 + 2
        assert _headers(volume)[0].seals_reserved == 4 + budget.RESERVE_STEP  # reserved before sealing
    finally:
        vol.close()
    assert [h.seals_reserved for h in _headers(volume)] == [16, 16]


def test_the_reservation_is_written_before_the_seals_it_allows_and_survives_a_crash(
        volume: Path, service: KeyService, small_budget: None) -> None:
    data = os.urandom(9 * SECTOR_SIZE)
    vol = open_volume(volume, service)
    vol.write(0, data[:3 * SECTOR_SIZE])  # 4 + 3 = 7: inside the first reservation (4 + 8)
    assert _headers(volume)[0].seals_reserved == 12
    vol.write(3 * SECTOR_SIZE, data[3 * SECTOR_SIZE:])  # 13 > 12: a new reservation first
    assert vol.seals == 13 and [h.seals_reserved for h in _headers(volume)] == [20, 20]
    vol.flush()
    os.close(vol.fd)  # the crash: no clean close, the reservation stands
    vol = open_volume(volume, service)
    try:
        assert vol.seals == 20  # used = reserved: a crash over-counts, never reuses the budget
        assert vol.read(0, len(data)) == data
    finally:
        vol.close()


def test_the_budget_warns_then_refuses_sector_writes(volume: Path, service: KeyService, small_budget: None,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    vol = open_volume(volume, service)
    try:
        data = os.urandom(36 * SECTOR_SIZE)
        vol.write(0, data)  # 4 + 36 = 40: the warning
        assert caplog.text.count("past 40 of 2^32 random-nonce seals") == 1
        vol.write(36 * SECTOR_SIZE, data[:18 * SECTOR_SIZE])  # 58
        vol.flush()  # 60
        with pytest.raises(OSError) as e:
            vol.write(0, data[:SECTOR_SIZE])
        assert e.value.errno == errno.ENOSPC
        with pytest.raises(OSError):
            vol.write(0, data[:SECTOR_SIZE])
        assert caplog.text.count("writes refused: the volume key has made 60 seals, the most it may make") == 1
        vol.flush()  # nothing dirty: a flush still works
    finally:
        vol.close()
    assert _headers(volume)[0].seals_reserved == 60
    info = _info(volume)
    assert info["seals_reserved"] == 60 and any("past 40; writes stop at 60" in w for w in info["warnings"])
    vol = open_volume(volume, service)  # the refusal holds across opens; what was written reads back
    try:
        assert vol.read(0, 36 * SECTOR_SIZE) == data
        with pytest.raises(OSError):
            vol.write(0, data[:SECTOR_SIZE])
    finally:
        vol.close()


def test_a_flush_after_the_refusal_still_commits_what_was_written(volume: Path, service: KeyService,
                                                                  small_budget: None) -> None:
    """Map seals may use what sector seals may not (SEAL_REFUSE to SEAL_MAX)."""
    vol = open_volume(volume, service)
    try:
        data = os.urandom(56 * SECTOR_SIZE)
        vol.write(0, data)  # 60: every sector seal spent, the map not yet committed
        with pytest.raises(OSError):
            vol.write(0, data[:SECTOR_SIZE])
        vol.flush()  # commit + mirror: 62 <= SEAL_MAX
        assert vol.seals == 62
    finally:
        vol.close()
    vol = open_volume(volume, service)
    try:
        assert vol.read(0, len(data)) == data
    finally:
        vol.close()


def test_a_failed_reservation_fails_the_write_and_seals_nothing(volume: Path, service: KeyService) -> None:
    """The reservation's header write fails: the write fails with it, and nothing is sealed."""
    vol = open_volume(volume, service)
    try:
        real = vol.headers.reserve

        def failing(_n: int) -> None:
            raise OSError(errno.EIO, "header write failed")

        vol.budget._persist = failing
        with pytest.raises(OSError):
            vol.write(0, b"x" * SECTOR_SIZE)
        assert vol.seals == 4 and vol.read(0, SECTOR_SIZE) == bytes(SECTOR_SIZE)
        vol.budget._persist = real
        vol.write(0, b"x" * SECTOR_SIZE)
        assert vol.seals == 5
    finally:
        vol.close()
