"""Rewrite copies of a CIPHERDIR's config as someone holding its key would (tests only).

``remac(cipherdir, home, patch)`` runs this file in a subprocess (SoftHSM2 is
loaded once per process, and the test process may already use another
token): it unwraps the filesystem secret on the real token of ``home``,
applies ``patch`` to each copy and computes the copy's MAC again, with
`cryptography` directly (FORMAT.md §6.1), not with encfs's code. The result
is a copy that verifies, so tests can build authenticated configs that
disagree or claim a newer format.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def remac(cipherdir: Path, home: Path, patch: dict[str, Any],
          names: tuple[str, ...] = ("encfs.conf", "encfs.conf.bak")) -> None:
    env = dict(os.environ, ENCFS_HOME=str(home))
    env.pop("SOFTHSM2_CONF", None)
    proc = subprocess.run([sys.executable, __file__, str(cipherdir), json.dumps(patch), *names],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr


def _mac(secret: bytes, body: dict[str, Any]) -> str:
    from cryptography.hazmat.primitives import hashes, hmac
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    key = HKDF(hashes.SHA256(), 32, salt=bytes.fromhex(body["fs_id"]), info=b"encfs config mac v2").derive(secret)
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())
    return base64.b64encode(h.finalize()).decode()


def main(argv: list[str]) -> None:
    from encfs.keys.service import KeyService

    cipherdir, patch, names = Path(argv[0]), json.loads(argv[1]), argv[2:]
    with KeyService.open(Path(os.environ["ENCFS_HOME"]), provision=False) as ks:
        for name in names:
            body = json.loads((cipherdir / name).read_bytes())
            context = {"encfs:fs": body["fs_id"], "encfs:purpose": "filesystem"}
            secret = ks.decrypt(base64.b64decode(body["wrapped_secret"]), context, key=body["key_id"]).plaintext
            body.pop("mac", None)
            body.update(patch)
            body["mac"] = _mac(secret, body)
            (cipherdir / name).write_text(json.dumps(body, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
