"""Read or write a detached volume through encfs in a separate process (the token of an
ENCFS_HOME is loaded there, not in pytest's process: SoftHSM2 serves one config per process).

    python volume_tool.py write IMAGE OFFSET < data     write at OFFSET, flush
    python volume_tool.py read IMAGE > data             the whole plaintext
"""

from __future__ import annotations

import sys
from pathlib import Path

from encfs.block.volume import open_volume
from encfs.keys.config import HsmOptions
from encfs.keys.service import KeyService


def main(argv: list[str]) -> None:
    with KeyService.open(None, HsmOptions()) as ks:
        vol = open_volume(Path(argv[1]), ks)
        try:
            if argv[0] == "write":
                vol.write(int(argv[2]), sys.stdin.buffer.read())
                vol.flush()
            else:
                sys.stdout.buffer.write(vol.read(0, vol.size))
        finally:
            vol.close()


if __name__ == "__main__":
    main(sys.argv[1:])
