"""Run many ``encfs`` command lines in one process, through encfs.cli.main as the ``encfs`` script
does (argparse, the one-line errors, the exit code), without a Python start-up per command.

    python cli_tool.py    then, per line on stdin:  {"argv": [...], "stdin": BASE64}
                          answered by one line:     {"code": N, "stdout": BASE64, "stderr": TEXT}

One process serves one ENCFS_HOME (SoftHSM2 loads one config per process). Commands that start a
daemon (mount, volume attach) are run as their own processes by the tests, not here.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import sys

from encfs import cli


def run(argv: list[str], stdin: bytes) -> tuple[int, bytes, str]:
    real = sys.stdin, sys.stdout, sys.stderr
    out, err = io.BytesIO(), io.BytesIO()
    streams = io.TextIOWrapper(io.BytesIO(stdin)), io.TextIOWrapper(out, write_through=True), \
        io.TextIOWrapper(err, write_through=True)
    sys.stdin, sys.stdout, sys.stderr = streams
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse: usage errors (2), --help (0)
        code = e.code if isinstance(e.code, int) else 2
    finally:
        for s in streams[1:]:
            s.flush()
        sys.stdin, sys.stdout, sys.stderr = real
        logging.getLogger().handlers.clear()  # main() adds one bound to this command's stderr
    result = code, out.getvalue(), err.getvalue().decode(errors="replace")
    for s in streams:
        s.detach()  # not closed with the wrappers: the buffers were read above
    return result


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        code, out, err = run(request["argv"], base64.b64decode(request.get("stdin", "")))
        print(json.dumps({"code": code, "stdout": base64.b64encode(out).decode(), "stderr": err}), flush=True)


if __name__ == "__main__":
    main()
