#!/usr/bin/env bash
# UDIF (.dmg) against independent readers: libyal's pymodi reads a UDRW
# image asiffs created and wrote random data into byte for byte, and reads
# Apple's vectors as asiffs does; qemu-img (its dmg driver) reads ours too.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
"$PYTHON" -c 'import pymodi' 2>/dev/null || fail "$PYTHON cannot import pymodi (run make deps)"
command -v qemu-img >/dev/null || fail "qemu-img is not installed (apt-get install qemu-utils)"
MODI_READ="$REPO_ROOT/tests/interop/modi_read.py"

# Until the CLI serves UDIF, examples/udif_tool drives asiffs::disk::open.
(cd "$REPO_ROOT" && cargo build --release --quiet --example udif_tool) || fail "building examples/udif_tool"
TOOL="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/examples/udif_tool"
[[ -x "$TOOL" ]] || fail "no udif_tool at $TOOL"

cd "$TESTDIR"

# A 6 MiB + 3-sector disk with random data: unaligned, across the 1 MiB
# runs, at the very end, and a zeroed block inside data.
SIZE=$((6 * 1024 * 1024 + 1536))
truncate -s "$SIZE" src.raw
put() { # put OFFSET_BYTES LENGTH_BYTES
    head -c "$2" /dev/urandom | dd of=src.raw bs=1 seek="$1" conv=notrunc status=none oflag=seek_bytes
}
put 0 4096
put $((1024 * 1024 - 700)) 1500
put $((2 * 1024 * 1024 + 512)) $((2 * 1024 * 1024 + 77))
dd if=/dev/zero of=src.raw bs=4096 seek=700 count=3 conv=notrunc status=none
put $((SIZE - 1536)) 1536

"$TOOL" create-from src.raw ours.dmg || fail "udif_tool create-from"
"$TOOL" check ours.dmg >check.out || { cat check.out >&2; fail "check of ours.dmg"; }
echo "PASS asiffs writes a UDRW image that checks clean"

got="$("$PYTHON" "$MODI_READ" ours.dmg modi.raw)" || fail "pymodi could not read ours.dmg"
assert_eq "$SIZE" "$got" "pymodi media size of ours.dmg"
cmp src.raw modi.raw || fail "pymodi reads ours.dmg differently from what was written"
echo "PASS pymodi reads our UDRW image byte for byte"

info="$(qemu-img info --output=json ours.dmg)" || fail "qemu-img info ours.dmg"
got="$(python3 -c 'import json,sys; i=json.load(sys.stdin); print(i["format"], i["virtual-size"])' <<<"$info")"
assert_eq "dmg $SIZE" "$got" "qemu-img info format and virtual size"
qemu-img convert -f dmg -O raw ours.dmg qemu.raw || fail "qemu-img convert ours.dmg"
cmp src.raw qemu.raw || fail "qemu-img reads ours.dmg differently"
echo "PASS qemu-img reads our UDRW image byte for byte"

alloc=$(($(stat -c %b ours.dmg) * 512))
[[ $alloc -lt $((5 * 1024 * 1024)) ]] || fail "ours.dmg holds $alloc bytes: zeros were not left as holes"
echo "PASS zero blocks stay holes in the host file ($alloc bytes allocated)"

# Apple's vectors: pymodi and asiffs agree, and match the README's MD5s.
for v in hfsplus_zlib:399bfcc39637bde7e43eb86fcc8565ae hfsplus_bzip2:7ec785450bbc17de417be373fd5d2159; do
    name="${v%%:*}" md5="${v##*:}"
    "$PYTHON" "$MODI_READ" "$VECTORS/udif/$name.dmg" "$name.modi" >/dev/null || fail "pymodi $name"
    "$TOOL" cat "$VECTORS/udif/$name.dmg" "$name.ours" || fail "udif_tool cat $name"
    cmp "$name.modi" "$name.ours" || fail "$name: asiffs and pymodi differ"
    assert_eq "$md5" "$(md5sum <"$name.ours" | cut -d' ' -f1)" "$name disk MD5"
done
echo "PASS pymodi and asiffs read both vectors identically"

# qemu reads zlib runs (bzip2 needs a module Debian does not ship).
qemu-img convert -f dmg -O raw "$VECTORS/udif/hfsplus_zlib.dmg" zlib.qemu || fail "qemu-img convert the zlib vector"
cmp zlib.qemu hfsplus_zlib.ours || fail "qemu-img and asiffs differ on the zlib vector"
echo "PASS qemu-img and asiffs read the zlib vector identically"
