#!/usr/bin/env bash
# The main job: the key service on the embedded SoftHSM2 token, step by step.
# ENCFS_HOME defaults to a fresh temporary directory (removed at the end unless KEEP=1).
set -euo pipefail
cd "$(dirname "$0")/.."
ENCFS=${ENCFS:-.venv/bin/encfs}
if [ -z "${ENCFS_HOME:-}" ]; then
    ENCFS_HOME=$(mktemp -d /tmp/encfs-demo.XXXXXX)
    [ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$ENCFS_HOME"' EXIT
fi
export ENCFS_HOME

run() { echo; echo "\$ encfs $*"; "$ENCFS" "$@"; }

echo "encfs demo, state in $ENCFS_HOME"
run hsm init
run hsm status
KEY=$("$ENCFS" key create --alias demo --description "demo master key")
echo; echo "\$ encfs key create --alias demo --description 'demo master key'"; echo "$KEY"
run key list
echo; echo "\$ encfs key generate-data-key demo --encryption-context purpose=demo,volume=vol-1"
"$ENCFS" key generate-data-key demo --encryption-context purpose=demo,volume=vol-1 > "$ENCFS_HOME/dk.json"
cat "$ENCFS_HOME/dk.json"
BLOB=$(.venv/bin/python -c 'import json,sys; print(json.load(open(sys.argv[1]))["CiphertextBlob"])' "$ENCFS_HOME/dk.json")
PLAIN=$(.venv/bin/python -c 'import json,sys; print(json.load(open(sys.argv[1]))["Plaintext"])' "$ENCFS_HOME/dk.json")
echo; echo "\$ encfs key decrypt --base64 --base64-out --encryption-context purpose=demo,volume=vol-1 <<< \$BLOB"
GOT=$(echo "$BLOB" | "$ENCFS" key decrypt --base64 --base64-out --encryption-context purpose=demo,volume=vol-1)
echo "$GOT"
[ "$GOT" = "$PLAIN" ] && echo "-> the decrypted data key equals the generated one"
echo; echo "\$ encfs key decrypt ... --encryption-context purpose=other   (wrong context must fail)"
if echo "$BLOB" | "$ENCFS" key decrypt --base64 --encryption-context purpose=other >/dev/null; then
    echo "BUG: decrypt with the wrong context succeeded" >&2; exit 1
fi
run key rotate demo
echo; echo "\$ encfs key decrypt ...   (the old blob still decrypts after rotation)"
echo "$BLOB" | "$ENCFS" key decrypt --base64 --base64-out --encryption-context purpose=demo,volume=vol-1
run key audit --tail 8

echo; echo "== the encrypted filesystem"
CIPHER="$ENCFS_HOME/cipher"; PLAIN="$ENCFS_HOME/plain"
mkdir -p "$PLAIN"
cleanup_mount() { mountpoint -q "$PLAIN" && { fusermount3 -u "$PLAIN" || fusermount3 -uz "$PLAIN"; }; true; }
trap 'cleanup_mount; [ "${KEEP:-0}" = 1 ] || rm -rf "$ENCFS_HOME"' EXIT
run init "$CIPHER" --key demo
run mount "$CIPHER" "$PLAIN"
echo; echo "\$ echo 'meet me at the harbour at 6' > $PLAIN/plans.txt; mkdir $PLAIN/photos; ln -s plans.txt $PLAIN/latest"
echo 'meet me at the harbour at 6' > "$PLAIN/plans.txt"
mkdir "$PLAIN/photos"
head -c 100000 /dev/urandom > "$PLAIN/photos/beach.jpg"
ln -s plans.txt "$PLAIN/latest"
echo; echo "\$ ls -l $PLAIN; cat $PLAIN/latest"
ls -l "$PLAIN"; cat "$PLAIN/latest"
echo; echo "\$ ls -l $CIPHER   (what is stored: encrypted names, sizes rounded by 4 KiB block overhead)"
ls -l "$CIPHER"
echo; echo "\$ grep -r harbour $CIPHER   (the plaintext appears nowhere)"
if grep -rq harbour "$CIPHER"; then echo "BUG: plaintext found in the ciphertext directory" >&2; exit 1; fi
echo "(no match)"
run info "$CIPHER"
run umount "$PLAIN"

echo; echo "== an encrypted block volume"
VOL="$ENCFS_HOME/disk.img"; EXT="$ENCFS_HOME/ext4"; LOOP=""
mkdir -p "$EXT"
cleanup_volume() {
    mountpoint -q "$EXT" && umount "$EXT"
    [ -n "$LOOP" ] && "$ENCFS" volume detach "$LOOP" >/dev/null 2>&1
    true
}
trap 'cleanup_volume; cleanup_mount; [ "${KEEP:-0}" = 1 ] || rm -rf "$ENCFS_HOME"' EXIT
run volume create "$VOL" --size 128M --key demo
echo; echo "\$ encfs volume attach $VOL"
LOOP=$("$ENCFS" volume attach "$VOL")
echo "$LOOP"
echo; echo "\$ mkfs.ext4 -q $LOOP && mount $LOOP $EXT && echo ... > $EXT/ledger.txt"
mkfs.ext4 -q "$LOOP"
mount "$LOOP" "$EXT"
echo "account 42: balance 1,000,000" > "$EXT/ledger.txt"
head -c 20000000 /dev/urandom > "$EXT/blob.bin"
sync
df -h "$EXT" | tail -1
cat "$EXT/ledger.txt"
run volume list
echo; echo "== a snapshot: instant, while attached and mounted"
SNAP=$("$ENCFS" snapshot create "$LOOP" --description "before the mistake" --json |
       python3 -c 'import json, sys; print(json.load(sys.stdin)["SnapshotId"])')
echo "\$ encfs snapshot create $LOOP --description 'before the mistake'"
echo "$SNAP"
echo "\$ echo 'account 42: balance 0' > $EXT/ledger.txt   (the mistake)"
echo "account 42: balance 0" > "$EXT/ledger.txt"
sync
run snapshot list "$VOL"
umount "$EXT"
run volume detach "$VOL"
LOOP=""
RESTORED="$ENCFS_HOME/restored.img"
run snapshot restore "$SNAP" "$RESTORED"
LOOP=$("$ENCFS" volume attach "$RESTORED")
mount "$LOOP" "$EXT"
echo "\$ cat ledger.txt   (in the volume restored from $SNAP)"
cat "$EXT/ledger.txt"
umount "$EXT"
"$ENCFS" volume detach "$LOOP" >/dev/null
LOOP=""
echo; echo "\$ grep -c 'balance 1,000,000' $VOL   (the image holds only ciphertext)"
if grep -aq 'balance 1,000,000' "$VOL"; then echo "BUG: plaintext found in the volume image" >&2; exit 1; fi
echo 0
run volume info "$VOL"

echo; echo "== moving both to another CMK (no content rewritten), retiring the first, checking"
"$ENCFS" key create --alias demo-2 --description "second master key" >/dev/null
echo; echo "\$ encfs key create --alias demo-2 --description 'second master key'"
run rekey "$VOL" --key demo-2
run rekey "$CIPHER" --key demo-2
run key disable demo
run fsck "$VOL"
run mount "$CIPHER" "$PLAIN"
echo "\$ cat $PLAIN/plans.txt   (under demo-2, with demo disabled)"
cat "$PLAIN/plans.txt"
run umount "$PLAIN"

echo; echo "== the key daemon: the token behind a socket, every use decided by key policy"
SOCK="$ENCFS_HOME/keyd.sock"
echo "\$ encfs keyd --socket $SOCK &"
"$ENCFS" keyd --socket "$SOCK" 2>"$ENCFS_HOME/keyd.log" &
KEYD=$!
cleanup_keyd() { [ -z "$KEYD" ] || { kill "$KEYD" 2>/dev/null; wait "$KEYD" 2>/dev/null; }; true; }
trap 'cleanup_keyd; cleanup_volume; cleanup_mount; [ "${KEEP:-0}" = 1 ] || rm -rf "$ENCFS_HOME"' EXIT
for _ in $(seq 300); do grep -q serving "$ENCFS_HOME/keyd.log" 2>/dev/null && break; sleep 0.1; done
cat "$ENCFS_HOME/keyd.log"
run key create --alias shared --description "created through the daemon" --keyd "$SOCK"
run key get-policy shared --keyd "$SOCK"
echo; echo "\$ printf 'db password' | encfs secret put app/db --kms-key-id shared --keyd $SOCK"
printf 'db password' | "$ENCFS" secret put app/db --kms-key-id shared --keyd "$SOCK"
echo; echo "\$ encfs secret get app/db --keyd $SOCK"
"$ENCFS" secret get app/db --keyd "$SOCK"; echo
run key audit --tail 3 --keyd "$SOCK"
kill "$KEYD"; wait "$KEYD" || true
KEYD=""
echo; echo "demo finished"
