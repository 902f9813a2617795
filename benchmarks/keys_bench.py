#!/usr/bin/env python3
"""Key service throughput on a throwaway embedded SoftHSM2 token.

Usage:
    .venv/bin/python benchmarks/keys_bench.py [--seconds N] [--threads 1,4] [--repeats 3] [--json out.json]

Provisions a fresh encfs home (and SoftHSM2 token) in a temporary directory, creates one CMK, and
measures, for each thread count, operations per second of:

    generate_data_key   GenerateDataKey (32-byte data key, one-pair context): token RNG + AES-GCM on the token
    decrypt             Decrypt of a data-key blob: AES-GCM decrypt on the token
    decrypt_cached      Decrypt of the same blob through a DataKeyCache hit (no token call)

Each cell runs --repeats times for --seconds each (after a short warm-up); the table shows the median
and the min/max of the repetitions. Every operation goes through the real KeyService, so the numbers
include metadata reads, key-state checks and the audit-log write (not for cache hits, which write no
audit record). This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from encfs.keys.cache import DataKeyCache
from encfs.keys.service import KeyService

CONTEXT = {"purpose": "benchmark"}
WARMUP_SECONDS = 0.2


def run_for(op: Callable[[], object], seconds: float, threads: int) -> float:
    """Run ``op`` in ``threads`` threads for ``seconds``; return completed operations per second."""
    counts = [0] * threads
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads + 1)
    deadline = [0.0]

    def worker(i: int) -> None:
        barrier.wait()
        end = deadline[0]
        n = 0
        try:
            while time.perf_counter() < end:
                op()
                n += 1
        except BaseException as e:  # surface worker failures in the main thread
            errors.append(e)
        counts[i] = n

    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    start = time.perf_counter()
    deadline[0] = start + seconds
    barrier.wait()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return sum(counts) / elapsed


def measure(op: Callable[[], object], seconds: float, threads: int, repeats: int) -> dict[str, Any]:
    run_for(op, min(WARMUP_SECONDS, seconds), threads)
    rates = [run_for(op, seconds, threads) for _ in range(repeats)]
    return {"threads": threads, "median": statistics.median(rates), "min": min(rates),
            "max": max(rates), "rates": rates}


def markdown(results: list[dict[str, Any]], single: dict[str, float]) -> str:
    lines = ["| operation | threads | median ops/s | min ops/s | max ops/s | us/op (1/median) | vs 1 thread |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        base = single.get(r["operation"])
        scale = f"{r['median'] / base:.2f}x" if base else "-"
        lines.append(f"| {r['operation']} | {r['threads']} | {r['median']:,.0f} | {r['min']:,.0f} | "
                     f"{r['max']:,.0f} | {1e6 / r['median']:.1f} | {scale} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each repetition (default 5)")
    parser.add_argument("--threads", default="1,4", help="comma-separated thread counts (default 1,4)")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions per cell (default 3)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument("--keep", action="store_true", help="keep the temporary encfs home")
    args = parser.parse_args(argv)
    try:
        thread_counts = [int(x) for x in args.threads.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--threads must be comma-separated integers, got {args.threads!r}")
    if not thread_counts or min(thread_counts) < 1 or args.seconds <= 0 or args.repeats < 1:
        parser.error("--threads, --seconds and --repeats must be positive")

    home = Path(tempfile.mkdtemp(prefix="encfs-bench-"))
    try:
        t0 = time.perf_counter()
        ks = KeyService.open(home / "home", provision=True)
        key = ks.create_key(description="benchmark")["KeyId"]
        setup_seconds = time.perf_counter() - t0
        token_info = ks.token.info()

        blob = ks.generate_data_key(key, CONTEXT).ciphertext_blob
        cache = DataKeyCache(max_age=1e9, max_entries=16)
        ks.decrypt(blob, CONTEXT, cache=cache)  # prime: the only miss
        operations: dict[str, Callable[[], object]] = {
            "generate_data_key": lambda: ks.generate_data_key(key, CONTEXT),
            "decrypt": lambda: ks.decrypt(blob, CONTEXT),
            "decrypt_cached": lambda: ks.decrypt(blob, CONTEXT, cache=cache),
        }

        results = []
        for name, op in operations.items():
            for threads in thread_counts:
                print(f"  {name} x{threads} thread(s) ...", file=sys.stderr, flush=True)
                results.append({"operation": name, **measure(op, args.seconds, threads, args.repeats)})
        cache_misses = cache.misses
        ks.close()
    finally:
        if args.keep:
            print(f"kept {home}", file=sys.stderr)
        else:
            shutil.rmtree(home, ignore_errors=True)

    single = {r["operation"]: r["median"] for r in results if r["threads"] == 1}
    env = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "pkcs11_library": f"{token_info['library_manufacturer']} {token_info['library']}".strip(),
        "setup_seconds": round(setup_seconds, 3),
        "seconds": args.seconds,
        "repeats": args.repeats,
        "cache_misses": cache_misses,
    }
    print(f"encfs key service, {env['pkcs11_library']}, Python {env['python']}, {env['cpus']} CPUs; "
          f"median of {args.repeats} x {args.seconds:g} s (setup incl. token provisioning: {setup_seconds:.2f} s)\n")
    print(markdown(results, single))
    if cache_misses != 1:
        print(f"\nnote: the data-key cache missed {cache_misses} times (expected 1)", file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"environment": env, "results": results}, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
