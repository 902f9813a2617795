"""The key daemon's token worker (encfs/keyd/worker.py) in this process's child: replies it cannot send (#24)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from keyd_rig import home_with_key

from encfs.keyd import worker
from encfs.keyd.dispatch import Dispatcher, Request
from encfs.keyd.principal import Principal
from encfs.keyd.roles import Roles


def test_a_reply_that_cannot_be_pickled_fails_its_request_not_the_worker(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home_with_key(home)
    monkeypatch.delenv("SOFTHSM2_CONF", raising=False)
    run_batch = Dispatcher.run_batch

    def with_a_bad_reply(self: Dispatcher, requests: Any) -> list[Any]:  # a bug's reply: a value pickle refuses
        replies = run_batch(self, requests)
        return [{"Oops": lambda: 0} if r.op == "Poison" else reply for r, reply in zip(requests, replies)]

    monkeypatch.setattr(Dispatcher, "run_batch", with_a_bad_reply)  # the forked worker inherits it
    sock, pid = worker.start(home, None, Roles())
    try:
        me = Principal.from_peer(os.getuid(), os.getgid(), os.getpid())
        worker.send_message(sock, [Request(me, "ListKeys", {}), Request(me, "Poison", {})])
        first = worker.recv_message(sock)
        worker.send_message(sock, [Request(me, "ListKeys", {})])
        second = worker.recv_message(sock)
    finally:
        worker.stop(sock, pid, timeout=5)
    assert first is not None and second is not None, "the token worker died"
    assert "Result" in first[0] and first[1]["Error"]["Type"] == "StateError"
    assert "Result" in second[0]
