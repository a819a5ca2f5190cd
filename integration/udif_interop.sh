#!/usr/bin/env bash
# UDIF (.dmg) against independent readers: libyal's pymodi reads a UDRW
# image asiffs created and wrote random data into byte for byte, an image
# with zero and free runs asiffs wrote into, and one it shrank and grew,
# and reads Apple's vectors as asiffs does; qemu-img (its dmg driver)
# reads ours too.
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

# An image as hdiutil makes UDRW ones: raw, zero and free runs (4 MiB;
# raw sectors 0..128 and 6144..6272, zero 128..4096 and 6272..8192, free
# 4096..6144), no checksums. asiffs writes into its zero and free runs
# (new space at the end of the data fork) through a mount.
head -c 131072 /dev/urandom >fork.bin
"$PYTHON" - fork.bin zero.dmg <<'PY' || fail "writing zero.dmg"
import plistlib, struct, sys
fork = open(sys.argv[1], "rb").read()
runs = [(1, 0, 128, 0, 65536), (0, 128, 3968, 0, 0), (2, 4096, 2048, 0, 0),
        (1, 6144, 128, 65536, 65536), (0, 6272, 1920, 0, 0), (0xFFFFFFFF, 8192, 0, 0, 0)]
mish = b"mish" + struct.pack(">IQQQII", 1, 0, 8192, 0, 2048, 1) + bytes(24)
mish += bytes(136) + struct.pack(">I", len(runs))
for t, s, n, o, l in runs:
    mish += struct.pack(">IIQQQQ", t, 0, s, n, o, l)
entry = {"Attributes": "0x0050", "CFName": "whole disk", "Data": mish, "ID": "0", "Name": "whole disk"}
xml = plistlib.dumps({"resource-fork": {"blkx": [entry]}})
koly = b"koly" + struct.pack(">IIIQQQQQII", 4, 512, 1, 0, 0, len(fork), 0, 0, 1, 1) + bytes(16)
koly += bytes(136) + struct.pack(">QQ", len(fork), len(xml)) + bytes(120) + bytes(136)
koly += struct.pack(">IQ", 1, 8192)
koly += bytes(512 - len(koly))
open(sys.argv[2], "wb").write(fork + xml + koly)
PY
truncate -s $((4 * 1024 * 1024)) zero.raw
dd if=fork.bin of=zero.raw bs=512 count=128 conv=notrunc status=none
dd if=fork.bin of=zero.raw bs=512 skip=128 seek=6144 count=128 conv=notrunc status=none
"$PYTHON" "$MODI_READ" zero.dmg zero.before >/dev/null || fail "pymodi could not read zero.dmg"
cmp zero.raw zero.before || fail "pymodi reads the hand-made zero.dmg differently"

# A resized image: ours.dmg, cut in the middle of a raw run, then grown.
cp ours.dmg resized.dmg
cp src.raw resized.raw
mkdir -p dir mnt
mv zero.dmg resized.dmg dir/
"$ASIFFS" mount dir mnt --log "$TESTDIR/mount.log" 2>"$TESTDIR/mount.err" || fail "mount: $(cat "$TESTDIR/mount.err")"
mountpoint -q mnt || fail "the mount did not appear"
both() { # both IMAGE ARGS...: the same dd into the mounted image and its raw copy
    local img="$1"
    shift
    dd of="mnt/$img.img" conv=notrunc status=none "$@" || fail "dd into mnt/$img.img"
    dd of="$img.raw" conv=notrunc status=none "$@" || fail "dd into $img.raw"
}
head -c $((3 * 1024 * 1024)) /dev/urandom >rand.bin
# Across the first raw run's end into the zero run; inside the free run;
# over the second raw run into the zero run after it; the last sector.
both zero if=rand.bin bs=512 count=9 seek=120
both zero if=rand.bin bs=512 skip=9 count=700 seek=4500
both zero if=rand.bin bs=512 skip=709 count=300 seek=6100
both zero if=rand.bin bs=512 skip=1009 count=1 seek=8191
truncate -s $((3 * 1024 * 1024 + 1536)) mnt/resized.img resized.raw
truncate -s $((SIZE + 5 * 1024 * 1024)) mnt/resized.img resized.raw
both resized if=rand.bin bs=512 skip=1010 count=2000 seek=$((SIZE / 512 + 100))
assert_eq "$((SIZE + 5 * 1024 * 1024))" "$(stat -c %s mnt/resized.img)" "size of the resized image"
"$ASIFFS" umount mnt || fail "umount"
for img in zero resized; do
    "$TOOL" check "dir/$img.dmg" >"$img.check" || { cat "$img.check" >&2; fail "check of $img.dmg"; }
    "$TOOL" cat "dir/$img.dmg" "$img.ours" || fail "udif_tool cat $img.dmg"
    cmp "$img.raw" "$img.ours" || fail "asiffs reads $img.dmg differently from what was written"
    got="$("$PYTHON" "$MODI_READ" "dir/$img.dmg" "$img.modi")" || fail "pymodi could not read $img.dmg"
    assert_eq "$(stat -c %s "$img.raw")" "$got" "pymodi media size of $img.dmg"
    cmp "$img.raw" "$img.modi" || fail "pymodi reads $img.dmg differently from what was written"
    qemu-img convert -f dmg -O raw "dir/$img.dmg" "$img.qemu" || fail "qemu-img convert $img.dmg"
    cmp "$img.raw" "$img.qemu" || fail "qemu-img reads $img.dmg differently from what was written"
done
echo "PASS pymodi and qemu-img read our writes into zero and free runs, and a shrunk and grown image, byte for byte"

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
