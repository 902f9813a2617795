"""Derived and wrapped file keys (FORMAT.md §6.4 "Key source"; encfs/fuse/filekeys.py), without a
mount: EncryptedFS, fsck and the re-keys called directly on a CIPHERDIR with the session's real
SoftHSM2 token."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
from test_fs_api import CTX, create, read

from encfs.errors import KeydUnavailable, KeyStateError
from encfs.fuse import filekeys
from encfs.fuse.fileheader import HEADER_LEN, FileHeader
from encfs.fuse.filekeys import DERIVED_TAG, TOKEN_RECHECK, FileKeys
from encfs.fuse.fs import EncryptedFS
from encfs.fuse.fsck import check_filesystem
from encfs.fuse.fsconfig import DERIVED_FEATURE, init_filesystem, open_config
from encfs.fuse.recovery import add_recovery_key, open_by_recovery_key
from encfs.fuse.recoverykeys import file_key
from encfs.fuse.rewrap import FULL, _write_marker, rewrap_filesystem
from encfs.fuseproto.wire import ROOT_ID, FuseError
from encfs.keys.service import KeyService
from encfs.recoverykey import read_recovery_key


def open_fs(cipher: Path, service: KeyService | None, read_only: bool = False) -> EncryptedFS:
    assert service is not None
    opened = open_config(cipher, service, writable=not read_only)
    return EncryptedFS(os.fsencode(cipher), opened.config, opened.keys, service, read_only=read_only)


def headers(cipher: Path) -> list[FileHeader]:
    """The header of every backing file of a content (regular, non-internal) file."""
    found = []
    for top, dirs, files in os.walk(cipher):
        dirs[:] = [d for d in dirs if not d.startswith("encfs.")]
        for name in files:
            path = Path(top) / name
            if name.startswith("encfs.") or not stat.S_ISREG(path.lstat().st_mode) or path.stat().st_size < HEADER_LEN:
                continue
            found.append(FileHeader.parse(path.read_bytes()[:HEADER_LEN]))
    return found


def audit_ops(service: KeyService) -> list[str]:
    return [r["operation"] for r in service.audit.read_all()]


def new_cipher(tmp_path: Path, service: KeyService, **kw: object) -> tuple[Path, str]:
    key = service.create_key()["KeyId"]
    cipher = tmp_path / "cipher"
    init_filesystem(cipher, service, key, **kw)  # type: ignore[arg-type]
    return cipher, key


def one_file(tmp_path: Path, service: KeyService, data: bytes, **kw: object) -> tuple[Path, str, Path]:
    """A new filesystem holding the file /f: its CIPHERDIR, CMK and backing file."""
    cipher, key = new_cipher(tmp_path, service, **kw)
    fs = open_fs(cipher, service)
    create(fs, b"f", data)
    fs.close_all()
    (path,) = [p for p in cipher.rglob("*") if p.is_file() and not p.name.startswith("encfs.")]
    return cipher, key, path


def read_f(cipher: Path, service: KeyService) -> bytes:
    """/f as a new read-only mount reads it (FuseError on failure)."""
    fs = open_fs(cipher, service, read_only=True)
    try:
        return read(fs, fs.lookup(ROOT_ID, b"f", CTX).st_ino)
    finally:
        fs.close_all()


def test_new_files_get_derived_keys_with_no_token_call(tmp_path: Path, service: KeyService) -> None:
    cipher, _key = new_cipher(tmp_path, service)
    assert DERIVED_FEATURE in open_config(cipher, service, writable=False).config.features
    fs = open_fs(cipher, service)
    before = len(audit_ops(service))
    inodes = [create(fs, b"f%d" % i, b"data %d" % i * 1000) for i in range(40)]
    assert [read(fs, ino) for ino in inodes] == [b"data %d" % i * 1000 for i in range(40)]
    assert len(audit_ops(service)) == before  # no GenerateDataKey, no Decrypt per file
    fs.close_all()
    found = headers(cipher)
    assert len(found) == 40 and all(h.derived and h.wrapped_key == b"" for h in found)
    again = open_fs(cipher, service, read_only=True)  # a new mount derives the same keys
    try:
        assert read(again, again.lookup(ROOT_ID, b"f7", CTX).st_ino) == b"data 7" * 1000
    finally:
        again.close_all()
    assert check_filesystem(cipher, service).findings == []


def test_wrapped_file_keys_keep_an_audit_record_per_file(tmp_path: Path, service: KeyService) -> None:
    cipher, _key = new_cipher(tmp_path, service, wrapped_file_keys=True)
    assert DERIVED_FEATURE not in open_config(cipher, service, writable=False).config.features
    fs = open_fs(cipher, service)
    before = audit_ops(service).count("GenerateDataKey")
    for name in (b"f", b"g", b"h"):
        create(fs, name, b"wrapped")
    fs.close_all()
    found = headers(cipher)
    assert len(found) == 3 and all(not h.derived and h.wrapped_key for h in found)
    # one token pass for a batch of 32 keys, one record per key: the 29 pooled and unused show too
    assert audit_ops(service).count("GenerateDataKey") - before == 32


def test_a_disabled_cmk_stops_creates_and_opens_at_once(tmp_path: Path, service: KeyService) -> None:
    cipher, key = new_cipher(tmp_path, service)
    fs = open_fs(cipher, service)
    try:
        ino = create(fs, b"f", b"before")
        service.disable_key(key)
        with pytest.raises(KeyStateError):
            fs.files.keys.new()
        with pytest.raises(FuseError, match="^5$"):
            create(fs, b"g", b"x")
        with pytest.raises(FuseError, match="^5$"):
            read(fs, ino)
        # The open itself fails, not only a read: a new open's reads may all come from the page
        # cache (FOPEN_KEEP_CACHE), and a read-only open leaves loading the file to its first read.
        with pytest.raises(FuseError, match="^5$"):
            fs.open(ino, os.O_RDONLY, CTX)
        service.enable_key(key)
        assert read(fs, ino) == b"before"
        create(fs, b"g", b"after")
    finally:
        fs.close_all()


def test_a_first_read_tries_again_what_may_pass_and_keeps_what_the_key_service_refused(
        tmp_path: Path, service: KeyService, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only handle loads its file at its first read (openload.py). An unreachable key daemon
    or a failing disk fails that read and the next read tries again; a CMK disabled between the
    open and the first read fails it, and that handle keeps failing once the CMK is enabled again,
    while a new open reads."""
    cipher, key = new_cipher(tmp_path, service)
    fs = open_fs(cipher, service)
    try:
        ino = create(fs, b"f", b"data")
        real_key = fs.files.keys.key
        for failure in (KeydUnavailable("cannot reach the key daemon"), OSError(errno.EIO, "disk")):
            failures = [failure]

            def flaky(header: FileHeader, failures: list[Exception] = failures) -> bytes:
                if failures:
                    raise failures.pop()
                return real_key(header)

            monkeypatch.setattr(fs.files.keys, "key", flaky)
            assert ino not in fs.files.contents
            fh = fs.open(ino, os.O_RDONLY, CTX)
            try:
                with pytest.raises(FuseError, match="^5$"):
                    fs.reader(fh)
                opened = fs.reader(fh)
                assert opened is not None and bytes(fs.read_open(opened, 0, 100)) == b"data"
            finally:
                fs.release(fh)
        monkeypatch.setattr(fs.files.keys, "key", real_key)
        fh = fs.open(ino, os.O_RDONLY, CTX)
        try:
            service.disable_key(key)
            with pytest.raises(FuseError, match="^5$"):
                fs.reader(fh)
            service.enable_key(key)
            with pytest.raises(FuseError, match="^5$"):
                fs.reader(fh)
            assert read(fs, ino) == b"data"
        finally:
            fs.release(fh)
    finally:
        fs.close_all()


def test_a_derived_header_without_the_feature_is_damaged(tmp_path: Path, service: KeyService) -> None:
    cipher, _key, path = one_file(tmp_path, service, b"wrapped", wrapped_file_keys=True)
    header = FileHeader.parse(path.read_bytes()[:HEADER_LEN])
    with open(path, "r+b") as f:
        f.write(FileHeader(header.file_id, b"").pack())
    with pytest.raises(FuseError, match="^5$"):
        read_f(cipher, service)
    assert [f.kind for f in check_filesystem(cipher, service).findings] == ["header"]


def test_fsck_names_a_wrapped_key_that_does_not_unwrap(tmp_path: Path, service: KeyService) -> None:
    cipher, _key, path = one_file(tmp_path, service, b"wrapped", wrapped_file_keys=True)
    with open(path, "r+b") as f:
        f.seek(40)  # inside the blob
        b = f.read(1)
        f.seek(40)
        f.write(bytes([b[0] ^ 0x40]))
    assert [f.kind for f in check_filesystem(cipher, service).findings] == ["wrapped-key"]
    with pytest.raises(FuseError, match="^5$"):
        read_f(cipher, service)


def test_rewrap_moves_derived_keys_with_the_secret(tmp_path: Path, service: KeyService) -> None:
    cipher, old, _path = one_file(tmp_path, service, b"derived")
    before = headers(cipher)
    new = service.create_key()["KeyId"]
    done = rewrap_filesystem(cipher, service, new)
    assert (done.files, done.damaged) == (0, [])  # no header to rewrite
    assert headers(cipher) == before
    service.disable_key(old)
    assert read_f(cipher, service) == b"derived"
    assert rewrap_filesystem(cipher, service, None, full=True).fresh == 1
    (after,) = headers(cipher)
    assert after.derived and after.file_id != before[0].file_id
    assert read_f(cipher, service) == b"derived"


def test_a_mount_by_the_recovery_key_reads_derived_files(tmp_path: Path, service: KeyService) -> None:
    recovery = os.urandom(32)
    cipher, old = new_cipher(tmp_path, service, recovery_key=lambda: recovery)
    fs = open_fs(cipher, service)
    create(fs, b"f", b"recoverable")
    fs.close_all()
    (header,) = headers(cipher)
    opened = open_config(cipher, service, writable=False)
    assert header.derived
    # the key is the file-key root's, not the recovery root's: the recovery key opens the secret
    assert opened.root is not None and file_key(opened.root, opened.config.fs_id, header.file_id) != \
        file_key(opened.keys.file_root, opened.config.fs_id, header.file_id)
    by_key = open_by_recovery_key(cipher, recovery, "test")
    fs = EncryptedFS(os.fsencode(cipher), by_key.config, by_key.keys, None, read_only=True)
    try:
        assert read(fs, fs.lookup(ROOT_ID, b"f", CTX).st_ino) == b"recoverable"
    finally:
        fs.close_all()
    # The HSM is lost: the recovery key moves the filesystem to a new CMK; the header stays.
    service.disable_key(old)
    new = service.create_key()["KeyId"]
    done = rewrap_filesystem(cipher, service, new, recovery_key=(recovery, "test"))
    assert (done.files, done.damaged) == (0, []) and headers(cipher) == [header]
    fs = open_fs(cipher, service)
    try:
        assert read(fs, fs.lookup(ROOT_ID, b"f", CTX).st_ino) == b"recoverable"
        create(fs, b"g", b"under the new CMK")
    finally:
        fs.close_all()


def test_the_token_is_asked_again_after_a_cached_keys_lifetime(tmp_path: Path, service: KeyService) -> None:
    """keys.json alone says Enabled once an older copy is put back after a disable; the token's key
    state refuses. Derived keys ask the token again after TOKEN_RECHECK, as a wrapped key's cache
    entry expires after as long."""
    cipher, key = new_cipher(tmp_path, service)
    opened = open_config(cipher, service, writable=False)
    now = [0.0]
    keys = FileKeys(opened.config, opened.keys, service, clock=lambda: now[0])
    header, fresh = keys.new()
    decrypts = audit_ops(service).count("Decrypt")
    now[0] = TOKEN_RECHECK - 1
    assert keys.key(header) == fresh and audit_ops(service).count("Decrypt") == decrypts  # metadata only
    now[0] = TOKEN_RECHECK
    assert keys.key(header) == fresh and audit_ops(service).count("Decrypt") == decrypts + 1  # the token
    saved = {name: (service.home / name).read_bytes() for name in ("keys.json", "keys.json.bak")
             if (service.home / name).exists()}
    service.disable_key(key)
    for name, data in saved.items():
        (service.home / name).write_bytes(data)
    assert service.key_usable(key, opened.config.fs_context())  # what the restored keys.json says
    keys.new()  # within TOKEN_RECHECK of the token's last answer: keys.json decides
    now[0] = 2 * TOKEN_RECHECK
    with pytest.raises(KeyStateError, match="rollback detected"):
        keys.new()
    with pytest.raises(KeyStateError, match="rollback detected"):
        keys.key(header)


def test_adding_a_recovery_key_to_derived_keys_rekeys_nothing(tmp_path: Path, service: KeyService) -> None:
    cipher, _key, _path = one_file(tmp_path, service, b"made before the recovery key")
    before = headers(cipher)
    added = add_recovery_key(cipher, service, str(tmp_path / "rk"), create=True)
    assert added.derived and added.files == 0 and not (cipher / "encfs.rekey").exists()
    assert headers(cipher) == before  # no file re-keyed: the wrapping's secret derives their keys
    by_key = open_by_recovery_key(cipher, read_recovery_key(str(tmp_path / "rk")), "test")
    fs = EncryptedFS(os.fsencode(cipher), by_key.config, by_key.keys, None, read_only=True)
    try:
        assert read(fs, fs.lookup(ROOT_ID, b"f", CTX).st_ino) == b"made before the recovery key"
    finally:
        fs.close_all()


def test_an_add_killed_after_its_key_file_is_finished_by_the_same_command(tmp_path: Path,
                                                                          service: KeyService) -> None:
    """On a derived filesystem `add` writes its marker too, so a kill between the new key file
    and the config leaves what `add --new-recovery-key FILE` finishes (taking that file)."""
    cipher, key, _path = one_file(tmp_path, service, b"kept")
    before = headers(cipher)
    rk = tmp_path / "rk"
    rk.write_text("ab" * 32 + "\n")
    rk.chmod(0o600)
    _write_marker(cipher, FULL, key, recovering=False, adding=True)  # the kill: marker and key file, no config
    added = add_recovery_key(cipher, service, str(rk), create=True)
    assert added.resumed and added.derived and not (cipher / "encfs.rekey").exists()
    assert headers(cipher) == before
    by_key = open_by_recovery_key(cipher, bytes.fromhex("ab" * 32), "test")
    fs = EncryptedFS(os.fsencode(cipher), by_key.config, by_key.keys, None, read_only=True)
    try:
        assert read(fs, fs.lookup(ROOT_ID, b"f", CTX).st_ino) == b"kept"
    finally:
        fs.close_all()


def test_add_finishes_an_interrupted_full_rekey_on_derived_keys(tmp_path: Path, service: KeyService) -> None:
    """Only add's own marker is dropped unfinished: another run's (`encfs rekey --full`, killed) is
    finished by the full re-key, as on any filesystem."""
    rk = tmp_path / "rk"
    rk.write_text("cd" * 32 + "\n")
    rk.chmod(0o600)
    cipher, key, _path = one_file(tmp_path, service, b"re-keyed", recovery_key=lambda: bytes.fromhex("cd" * 32))
    before = headers(cipher)
    _write_marker(cipher, FULL, key, recovering=False)  # a killed `encfs rekey --full`
    added = add_recovery_key(cipher, service, str(rk), create=False)
    assert added.resumed and not added.derived and added.files == 1 and not (cipher / "encfs.rekey").exists()
    (after,) = headers(cipher)
    assert after.derived and after.file_id != before[0].file_id
    assert read_f(cipher, service) == b"re-keyed"


def test_a_derived_key_is_kept_in_the_key_cache_and_checked_on_a_hit(tmp_path: Path, service: KeyService,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cipher, key = new_cipher(tmp_path, service)
    fs = open_fs(cipher, service)
    try:
        ino = create(fs, b"f", b"cached")
        (header,) = headers(cipher)
        assert fs.files.key_cache.get(header.file_id, DERIVED_TAG) is not None  # seeded by the create
        derived: list[bytes] = []
        real = filekeys.file_key
        monkeypatch.setattr(filekeys, "file_key", lambda *a: derived.append(a[2]) or real(*a))
        assert read(fs, ino) == b"cached" and derived == []  # a hit: no HKDF
        fs.files.key_cache.clear()
        assert read(fs, ino) == b"cached" and derived == [header.file_id]
        service.disable_key(key)
        with pytest.raises(FuseError, match="^5$"):
            read(fs, ino)  # the CMK check comes before the cache
    finally:
        fs.close_all()
