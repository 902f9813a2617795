"""Set the seal count in a backing file's state, as someone holding its data key would (tests only).

``set_seals(cipherdir, home, backing, seals)`` runs this file in a subprocess (SoftHSM2 is
loaded once per process): it unwraps the file's data key on the real token of ``home`` and
rewrites the state (docs/FORMAT.md §6.4: its xattr, or its state file on a backing store without
user xattrs) with the same synced size and ``seals``, so a test
can bring a file to the edge of its data key's nonce budget without 2^31 writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def set_seals(cipherdir: Path, home: Path, backing: Path, seals: int) -> None:
    env = dict(os.environ, ENCFS_HOME=str(home))
    env.pop("SOFTHSM2_CONF", None)
    proc = subprocess.run([sys.executable, __file__, str(cipherdir), str(backing), str(seals)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr


def main(argv: list[str]) -> None:
    from encfs.blocks import BlockCipher
    from encfs.fuse.fileheader import (
        FileHeader,
        FileState,
        read_state,
        state_file,
        user_xattrs_supported,
        write_state,
    )
    from encfs.fuse.filekeys import FileKeys
    from encfs.fuse.fsconfig import open_config
    from encfs.keys.service import KeyService

    cipherdir, backing, seals = Path(argv[0]), Path(argv[1]), int(argv[2])
    config = json.loads((cipherdir / "encfs.conf").read_bytes())
    block = 32768 if "aes256gcm-32k-blocks" in config["features"] else 4096
    fd = os.open(backing, os.O_RDWR)
    try:
        header = FileHeader.parse(os.pread(fd, 128, 0))
        with KeyService.open(Path(os.environ["ENCFS_HOME"]), provision=False) as ks:
            opened = open_config(cipherdir, ks, writable=False)
            key = FileKeys(opened.config, opened.keys, ks).key(header)  # derived or wrapped
        cipher = BlockCipher(key, header.file_id, block)
        side = None if user_xattrs_supported(os.fsencode(cipherdir)) else state_file(os.fsencode(cipherdir),
                                                                                      header.file_id)
        state = read_state(fd, cipher, side)
        assert state is not None, "the file's state does not authenticate"
        write_state(fd, cipher, FileState(state.synced_size, seals), side)
    finally:
        os.close(fd)


if __name__ == "__main__":
    main(sys.argv[1:])
