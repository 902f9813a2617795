#!/usr/bin/env python3
"""The key daemon's throughput beside the in-process key service, in one run (issue #24).

Usage:
    .venv/bin/python benchmarks/keyd_bench.py [--seconds N] [--clients 1,16,256] [--repeats 3] [--json out.json]

Provisions a throwaway encfs home (embedded SoftHSM2 token), measures GenerateDataKey and Decrypt
in process (one thread: the token serializes every call, so that is the in-process rate), then starts
a real `encfs keyd` on a temporary socket, creates a CMK through it, and measures the same two
operations through the daemon with 1, 16 and 256 concurrent clients. Clients are separate
connections spread over up to 4 processes (threads within each), so client-side Python does not
share the daemon's interpreter. The goal (#24) is at least 0.5 of the in-process rate at 16 clients.
This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CONTEXT = {"purpose": "benchmark"}
OPERATIONS = ("generate_data_key", "decrypt")
MAX_PROCESSES = 4


def _op(ks: Any, name: str, key: str, blob: bytes) -> Callable[[], object]:
    if name == "generate_data_key":
        return lambda: ks.generate_data_key(key, CONTEXT)
    return lambda: ks.decrypt(blob, CONTEXT)


def _client_process(sock: str, name: str, key: str, blob: bytes, threads: int, start_at: float, seconds: float,
                    out: Any) -> None:
    from encfs.keyd.client import KeydAddress, RemoteKeyService

    counts = [0] * threads
    errors: list[str] = []

    def worker(i: int) -> None:
        ks = RemoteKeyService(KeydAddress(sock))
        op = _op(ks, name, key, blob)
        op()  # connect before the clock starts
        while time.time() < start_at:
            time.sleep(0.001)
        end = start_at + seconds
        n = 0
        try:
            while time.time() < end:
                op()
                n += 1
        except Exception as e:  # noqa: BLE001 - reported by the parent
            errors.append(f"{type(e).__name__}: {e}")
        counts[i] = n
        ks.close()

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.put((sum(counts), errors))


def through_daemon(sock: Path, name: str, key: str, blob: bytes, clients: int, seconds: float) -> float:
    procs = min(clients, MAX_PROCESSES)
    share = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    ctx = multiprocessing.get_context("fork")  # "spawn" cannot find a module loaded by path (encfs bench)
    out = ctx.Queue()
    start_at = time.time() + 1.0 + clients * 0.004  # every connection open before the clock starts
    workers = [ctx.Process(target=_client_process, args=(str(sock), name, key, blob, n, start_at, seconds, out))
               for n in share]
    for w in workers:
        w.start()
    results = [out.get(timeout=seconds + 120) for _ in workers]
    for w in workers:
        w.join(30)
    errors = [e for _, errs in results for e in errs]
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed, first: {errors[0]}")
    return sum(n for n, _ in results) / seconds


def in_process(ks: Any, name: str, key: str, blob: bytes, seconds: float) -> float:
    op = _op(ks, name, key, blob)
    end = time.perf_counter() + 0.2
    while time.perf_counter() < end:
        op()
    n, start = 0, time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        op()
        n += 1
    return n / (time.perf_counter() - start)


def measure(seconds: float, client_counts: list[int], repeats: int, note: Callable[[str], None]) -> dict[str, Any]:
    """{operation: {"in_process": [rates], "clients": {n: [rates]}}} on a fresh home and daemon."""
    from encfs.keyd.client import KeydAddress, RemoteKeyService
    from encfs.keyd.server import answers
    from encfs.keys.service import KeyService

    work = Path(tempfile.mkdtemp(prefix="encfs-keyd-bench-"))
    home, sock = work / "home", work / "keyd.sock"
    env = dict(os.environ, ENCFS_HOME=str(home))
    env.pop("SOFTHSM2_CONF", None)
    results: dict[str, Any] = {op: {"in_process": [], "clients": {n: [] for n in client_counts}} for op in OPERATIONS}
    daemon = None
    try:
        subprocess.run([sys.executable, "-m", "encfs", "hsm", "init"], env=env, check=True, capture_output=True)
        daemon = subprocess.Popen([sys.executable, "-m", "encfs", "keyd", "--socket", str(sock)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not answers(sock):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("encfs keyd did not start")
            time.sleep(0.05)
        remote = RemoteKeyService(KeydAddress(str(sock)))
        key = remote.create_key("benchmark")["KeyId"]
        blob = remote.generate_data_key(key, CONTEXT).ciphertext_blob
        remote.close()
        for _ in range(repeats):
            for op in OPERATIONS:
                for n in client_counts:
                    note(f"keyd {op} x{n} client(s)")
                    results[op]["clients"][n].append(through_daemon(sock, op, key, blob, n, seconds))
        daemon.send_signal(signal.SIGTERM)  # the token to this process alone from here
        daemon.wait(30)
        daemon = None
        ks = KeyService.open(home)
        try:
            for _ in range(repeats):
                for op in OPERATIONS:
                    note(f"in-process {op}")
                    results[op]["in_process"].append(in_process(ks, op, key, blob, seconds))
        finally:
            ks.close()
    finally:
        if daemon is not None:
            daemon.kill()
            daemon.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    return results


LABELS = {"generate_data_key": "GenerateDataKey", "decrypt": "Decrypt"}


def rows(seconds: float, client_counts: list[int], note: Callable[[str], None]) -> dict[str, float]:
    """One repetition, flat for `encfs bench`: each operation's in-process rate, its rate through
    the daemon per client count, and their ratio measured in this same repetition."""
    out: dict[str, float] = {}
    for op, r in measure(seconds, client_counts, 1, note).items():
        base = r["in_process"][0]
        out[f"{op}_inproc_0"] = base
        for n, rates in r["clients"].items():
            out[f"{op}_keyd_{n}"] = rates[0]
            out[f"{op}_ratio_{n}"] = rates[0] / base
    return out


def label(key: str) -> tuple[str, str]:
    op, kind, n = key.rsplit("_", 2)
    name = LABELS[op]
    if kind == "inproc":
        return f"{name}, in process (1 thread)", "ops/s"
    if kind == "keyd":
        return f"{name}, keyd, {n} client(s)", "ops/s"
    return f"{name}, keyd at {n} client(s) / in process", "ratio"


def order(key: str) -> tuple[int, int, int]:
    op, kind, n = key.rsplit("_", 2)
    return list(LABELS).index(op), ["inproc", "keyd", "ratio"].index(kind), int(n)


def markdown(results: dict[str, Any]) -> str:
    lines = ["| operation | path | median ops/s | min | max | vs in-process |", "|---|---|---:|---:|---:|---:|"]
    for op, r in results.items():
        base = statistics.median(r["in_process"])
        lines.append(f"| {op} | in process (1 thread) | {base:,.0f} | {min(r['in_process']):,.0f} | "
                     f"{max(r['in_process']):,.0f} | 1.00 |")
        for n, rates in r["clients"].items():
            med = statistics.median(rates)
            lines.append(f"| {op} | keyd, {n} client(s) | {med:,.0f} | {min(rates):,.0f} | {max(rates):,.0f} | "
                         f"{med / base:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each measurement (default 3)")
    parser.add_argument("--clients", default="1,16,256", help="comma-separated client counts (default 1,16,256)")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    args = parser.parse_args(argv)
    counts = [int(x) for x in args.clients.split(",") if x.strip()]
    results = measure(args.seconds, counts, args.repeats, lambda m: print(f"  {m} ...", file=sys.stderr, flush=True))
    print(markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
