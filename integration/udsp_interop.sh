#!/usr/bin/env bash
# UDSP interoperability with an independent reader: libyal's libmodi
# (pymodi, via tests/interop/modi_read.py) must read a .sparseimage that
# asiffs created and filled with random data byte for byte as the raw disk
# it came from. libmodi reads only the header node's 1008 band ids, so the
# images here stay within 1008 bands.
#
# The image is written through the library by examples/udsp_tool.rs (built
# here unless UDSP_TOOL names it), in a shuffled order of unaligned pieces,
# so bands land in the file out of logical order.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

"$PYTHON" -c 'import pymodi' 2>/dev/null || fail "$PYTHON cannot import pymodi (run make deps)"
MODI_READ="$REPO_ROOT/tests/interop/modi_read.py"
if [[ -z "${UDSP_TOOL:-}" ]]; then
    log "building examples/udsp_tool"
    (cd "$REPO_ROOT" && cargo build --release --quiet --example udsp_tool) || fail "cannot build udsp_tool"
    UDSP_TOOL="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/examples/udsp_tool"
fi
[[ -x "$UDSP_TOOL" ]] || fail "udsp_tool not found at $UDSP_TOOL"

MIB=$((1 << 20))
KIB=1024
seed="${INTEROP_SEED:-$RANDOM$RANDOM}"
log "random data with seed $seed (set INTEROP_SEED=$seed to replay)"
cd "$TESTDIR"

# make_raw FILE SIZE SEED: a sparse raw disk with fixed edge cases and
# random extents of random bytes.
make_raw() {
    truncate -s "$2" "$1"
    python3 - "$1" "$2" "$3" <<'PY'
import random, sys
path, size, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
extents = [(0, 512), (size - 700, 700), (size // 2 - 3, 4099)]
for _ in range(40):
    length = rng.choice([1, 511, 4096, 65537, 300000, 1 << 20])
    length = min(length, size)
    extents.append((rng.randrange(0, size - length + 1), length))
with open(path, "r+b") as f:
    for off, length in extents:
        f.seek(off)
        f.write(rng.randbytes(length))
PY
}

# one BAND SIZE: create, fill, and compare what libmodi and asiffs read.
one() {
    local band="$1" size="$2" name="b$1"
    log "band size $band, disk $size bytes ($(((size + band - 1) / band)) bands)"
    make_raw "$name.raw" "$size" "$seed"
    "$UDSP_TOOL" from-raw "$name.raw" "$name.sparseimage" "$band" "$seed"
    [[ "$(head -c 4 "$name.sparseimage")" == sprs ]] || fail "$name.sparseimage has no sprs magic"
    local len
    len="$(stat -c %s "$name.sparseimage")"
    [[ $(((len - 4096) % band)) -eq 0 ]] || fail "$name.sparseimage is $len bytes: not the header node plus whole bands"

    local msize
    msize="$("$PYTHON" "$MODI_READ" "$name.sparseimage" "$name.modi.raw")"
    assert_eq "$size" "$msize" "libmodi's media size of $name.sparseimage"
    assert_same_content "$name.raw" "$name.modi.raw"
    cmp "$name.raw" "$name.modi.raw" || fail "cmp: libmodi's reading of $name.sparseimage differs"

    "$UDSP_TOOL" to-raw "$name.sparseimage" "$name.back.raw"
    cmp "$name.raw" "$name.back.raw" || fail "cmp: asiffs's reading of $name.sparseimage differs"
    rm -f "$name.raw" "$name.modi.raw" "$name.back.raw" "$name.sparseimage"
}

one $MIB $((1000 * MIB + 512))
one $((64 * KIB)) $((63 * MIB - 4096))
# One-sector bands, every header slot in use.
one 512 $((1008 * 512))

log "ok"
