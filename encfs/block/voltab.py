"""The volume table, /etc/encfs/volumes (ENCFS_VOLTAB), in crypttab style, for
``encfs volume attach-all`` (run at boot by contrib/systemd/encfs-volumes.service).

One volume a line: ``NAME IMAGE [OPTIONS]``; ``#`` starts a comment. OPTIONS is a
comma-separated list of ``ro`` (attach read-only), ``key=KEY`` (refuse another CMK),
``log-file=FILE`` (the daemon log) and ``noauto`` (attach-all skips it). Invariant: a bad
line is refused with its line number before anything is attached.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from encfs.block.attach import check_name
from encfs.block.volume import VolumeError

VOLTAB = Path(os.environ.get("ENCFS_VOLTAB", "/etc/encfs/volumes"))


@dataclass(frozen=True)
class VolumeLine:
    name: str
    image: Path
    read_only: bool = False
    key: str | None = None
    log_file: str | None = None
    auto: bool = True


def parse(text: str, source: str = str(VOLTAB)) -> list[VolumeLine]:
    out: list[VolumeLine] = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue

        def bad(why: str, number: int = number) -> VolumeError:
            return VolumeError(f"{source}:{number}: {why}")

        if len(fields) not in (2, 3):
            raise bad("expected NAME IMAGE [OPTIONS]")
        name, image = fields[0], fields[1]
        try:
            check_name(name)
        except VolumeError as e:
            raise bad(e.message) from None
        if not image.startswith("/"):
            raise bad(f"the image {image} is not an absolute path")
        if any(v.name == name for v in out):
            raise bad(f"volume name {name} appears twice")
        opts: dict[str, object] = {}
        for opt in (fields[2].split(",") if len(fields) == 3 else []):
            key, eq, value = opt.partition("=")
            if opt in ("ro", "noauto", "defaults"):
                opts.update({"ro": {"read_only": True}, "noauto": {"auto": False}, "defaults": {}}[opt])
            elif eq and value and key in ("key", "log-file"):
                opts[key.replace("-", "_")] = value
            else:
                raise bad(f"unknown option {opt!r} (ro, key=KEY, log-file=FILE, noauto)")
        out.append(VolumeLine(name, Path(image), **opts))  # type: ignore[arg-type]
    return out


def read(path: Path = VOLTAB) -> list[VolumeLine]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        raise VolumeError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    return parse(text, str(path))
