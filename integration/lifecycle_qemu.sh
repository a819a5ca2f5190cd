#!/usr/bin/env bash
# Images made by qemu-img (qcow2, vmdk, vdi, vhdx, vpc) convert to ASIF and
# back to raw identically, holes staying holes; resize keeps the content.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
require_asiffs
command -v qemu-img >/dev/null || fail "qemu-img is not installed (apt-get install qemu-utils)"

cd "$TESTDIR"

# A 64 MiB + 4 KiB raw disk with scattered random data: unaligned, across
# chunk boundaries, and at the very end.
SIZE=$((64 * 1024 * 1024 + 4096))
truncate -s "$SIZE" src.raw
put() { # put OFFSET_BYTES LENGTH_BYTES
    head -c "$2" /dev/urandom | dd of=src.raw bs=1 seek="$1" conv=notrunc status=none oflag=seek_bytes
}
put 0 4096
put $((1024 * 1024 - 700)) 1500
put $((3 * 1024 * 1024 + 512)) $((2 * 1024 * 1024 + 77))
put $((40 * 1024 * 1024)) $((1024 * 1024))
put $((SIZE - 4096)) 4096

# raw itself first.
"$ASIFFS" convert src.raw raw.asif
"$ASIFFS" check raw.asif >/dev/null || fail "check of raw.asif"
"$ASIFFS" convert raw.asif raw.back
cmp src.raw raw.back || fail "raw -> asif -> raw differs"
echo "PASS raw -> asif -> raw identical"

for fmt in qcow2 vmdk vdi vhdx vpc; do
    opts=()
    [[ $fmt == vpc ]] && opts=(-o force_size=on) # keep the exact size, not CHS-rounded
    qemu-img convert -q -f raw -O "$fmt" "${opts[@]}" src.raw "src.$fmt"
    vsize="$(qemu-img info --output=json "src.$fmt" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')"
    assert_eq "$SIZE" "$vsize" "$fmt virtual size"
    out="$("$ASIFFS" convert "src.$fmt" "$fmt.asif" 2>&1)" || fail "convert $fmt -> asif: $out"
    assert_eq "" "$out" "convert $fmt -> asif output (quiet when not on a terminal)"
    "$ASIFFS" check "$fmt.asif" >/dev/null || fail "check of $fmt.asif"
    got="$("$ASIFFS" info --json "$fmt.asif" | python3 -c 'import json,sys; i=json.load(sys.stdin); print(i["virtual_size"], i["data_chunks"])')"
    # Chunks 0, 1, 3, 4, 5, 40 and 64 hold data, plus the metadata chunk.
    assert_eq "$SIZE 8" "$got" "$fmt.asif virtual size and data chunks"
    "$ASIFFS" convert "$fmt.asif" "$fmt.raw"
    cmp src.raw "$fmt.raw" || fail "$fmt -> asif -> raw differs from the source"
    echo "PASS $fmt -> asif -> raw identical"
done

# No qemu-nbd server outlives its conversion.
if pgrep -f "qemu-nbd.*$TESTDIR" >/dev/null; then
    fail "a qemu-nbd server is still running for $TESTDIR"
fi
echo "PASS no qemu-nbd left running"

# Resize: grow, shrink with --shrink, grow back; the kept part is unchanged
# and the regrown part reads zeros.
cp --sparse=always qcow2.asif r.asif
assert_exit 1 "$ASIFFS" resize r.asif -1M
"$ASIFFS" resize r.asif +1G >/dev/null
"$ASIFFS" resize r.asif 4M --shrink >/dev/null
"$ASIFFS" resize r.asif "$SIZE" >/dev/null
"$ASIFFS" check r.asif >/dev/null || fail "check after resizing"
"$ASIFFS" convert r.asif r.raw
cmp -n $((4 * 1024 * 1024)) src.raw r.raw || fail "resize changed the first 4 MiB"
head -c $((SIZE - 4 * 1024 * 1024)) /dev/zero >zeros
cmp -i $((4 * 1024 * 1024)):0 r.raw zeros || fail "regrown range is not zero"
echo "PASS resize keeps content, regrown range reads zeros"
