"""The key daemon's token worker (encfs/keyd/worker.py) in a child of a fresh process: replies it
cannot send (#24). A fresh process (``python -c``) because the worker loads the embedded token's
SoftHSM2, which a test process may already hold with another configuration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from keyd_rig import home_with_key

SCENARIO = r"""
import json, os, sys
from pathlib import Path
from encfs.keyd import worker
from encfs.keyd.dispatch import Dispatcher, Request
from encfs.keyd.principal import Principal
from encfs.keyd.roles import Roles

run_batch = Dispatcher.run_batch
def with_a_bad_reply(self, requests):  # a bug's reply: a value pickle refuses
    replies = run_batch(self, requests)
    return [{"Oops": lambda: 0} if r.op == "Poison" else reply for r, reply in zip(requests, replies)]
Dispatcher.run_batch = with_a_bad_reply  # the forked worker inherits it

sock, pid = worker.start(Path(sys.argv[1]), None, Roles())
try:
    me = Principal.from_peer(os.getuid(), os.getgid(), os.getpid())
    worker.send_message(sock, [Request(me, "ListKeys", {}), Request(me, "Poison", {})])
    first = worker.recv_message(sock)
    worker.send_message(sock, [Request(me, "ListKeys", {})])
    second = worker.recv_message(sock)
finally:
    worker.stop(sock, pid, timeout=5)
print(json.dumps([first, second]))
"""


def test_a_reply_that_cannot_be_pickled_fails_its_request_not_the_worker(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home_with_key(home)
    env = dict(os.environ)
    env.pop("SOFTHSM2_CONF", None)
    proc = subprocess.run([sys.executable, "-c", SCENARIO, str(home)], capture_output=True, text=True, env=env,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    first, second = json.loads(proc.stdout.splitlines()[-1])
    assert first is not None and second is not None, "the token worker died"
    got: list[Any] = first
    assert "Result" in got[0] and got[1]["Error"]["Type"] == "StateError"
    assert "Result" in second[0]
