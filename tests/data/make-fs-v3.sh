#!/bin/bash
# Makes tests/data/fs-v3.tar.gz with the encfs checked out at $1 (see README.md). Run as root, from a
# directory outside any encfs source tree (`python -m encfs` looks in the current directory first).
set -euo pipefail
SRC=$(realpath "$1"); OUT=$(realpath "$2"); PY=${PYTHON:-python3}
W=/tmp/mlfix3; rm -rf "$W"; mkdir -p "$W/plain"
export ENCFS_HOME=$W/home PYTHONPATH=$SRC
unset SOFTHSM2_CONF
$PY -m encfs key create --alias fs >/dev/null
$PY -m encfs init "$W/cipher" --key fs >/dev/null
# In the foreground (in the background of this shell), so that the daemon is this process, with PYTHONPATH.
$PY -m encfs mount --foreground "$W/cipher" "$W/plain" & DAEMON=$!
for _ in $(seq 600); do mountpoint -q "$W/plain" && break; sleep 0.1; done
mountpoint -q "$W/plain"
P=$W/plain
mkdir -p "$P/d"
$PY -c 'import sys; open(sys.argv[1], "wb").write(bytes((7 * i + 3) % 251 for i in range(100000)))' "$P/d/blocks.bin"
printf 'hello from encfs before sparse files\n' > "$P/hello.txt"
$PY -m encfs umount "$P"
wait $DAEMON
rm -f "$W/home/audit.log"
tar --xattrs --xattrs-include='user.*' --format=pax -C "$W" -czf "$OUT" home cipher
rm -rf "$W"
