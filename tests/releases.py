"""Unpacking the state a previous release made (tests/data/*.tar.gz, described in tests/data/README.md)."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

DATA = Path(__file__).parent / "data"


def extract_release(tarball: str, root: Path) -> Path:
    """Unpack tests/data/``tarball`` into ``root`` with its backing xattrs (pax ``SCHILY.xattr.*``), and
    point its embedded token's softhsm2.conf at the unpacked token directory (provisioning wrote an
    absolute path). Returns ``root``."""
    with tarfile.open(DATA / tarball) as tar:
        tar.extractall(root, filter="tar")
        for member in tar.getmembers():
            for key, value in member.pax_headers.items():
                if key.startswith("SCHILY.xattr."):
                    os.setxattr(root / member.name, key[len("SCHILY.xattr."):],
                                value.encode("utf-8", "surrogateescape"), follow_symlinks=False)
    conf = root / "home" / "softhsm" / "softhsm2.conf"
    conf.write_text("".join(f"directories.tokendir = {root / 'home' / 'softhsm' / 'tokens'}\n"
                            if line.startswith("directories.tokendir") else line
                            for line in conf.read_text().splitlines(keepends=True)))
    return root
