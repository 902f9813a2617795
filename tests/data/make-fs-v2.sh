#!/bin/bash
# Makes tests/data/fs-v2.tar.gz with the encfs checked out at $1 (see README.md). Run as root.
set -euo pipefail
SRC=$(realpath "$1"); OUT=$(realpath "$2"); PY=${PYTHON:-python3}
W=/tmp/mlfix2; rm -rf "$W"; mkdir -p "$W/plain"
export ENCFS_HOME=$W/home PYTHONPATH=$SRC
unset SOFTHSM2_CONF
$PY -m encfs key create --alias fs >/dev/null
$PY -m encfs init "$W/cipher" --key fs >/dev/null
$PY -m encfs mount "$W/cipher" "$W/plain"
P=$W/plain
mkdir -p "$P/a/b" "$P/a/$(printf 'L%.0s' $(seq 200))"
printf 'deep\n' > "$P/a/b/deep.txt"
printf 'f\n' > "$P/a/f.txt"
printf 'inner\n' > "$P/a/$(printf 'L%.0s' $(seq 200))/inner.txt"
setfattr -n user.comment -v "hello xattr" "$P/a/f.txt"
setfattr -n user.dirattr -v "d" "$P/a"
ln -s a/f.txt "$P/link"
ln -s "$(printf 'y%.0s' $(seq 3100))" "$P/a/longlink"
ln -s a/b/deep.txt "$P/hard1"
ln -P "$P/hard1" "$P/hard2"
$PY -m encfs umount "$P"
rm -f "$W/home/audit.log"
tar --xattrs --xattrs-include='user.*' --format=pax -C "$W" -czf "$OUT" home cipher
rm -rf "$W"
