#!/usr/bin/env bash
# Interoperability with an independent reader: dissect.hypervisor's ASIF class
# (via tests/interop/dissect_read.py) must see exactly what asiffs wrote, and
# asiffs must read Apple's own images exactly as dissect and the vector README
# say.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
require_asiffs
require_python_dissect

GIB=$((1 << 30))
MIB=$((1 << 20))
BASIC_SHA=fc6505543ff7fe23cd82f71378a79217cecff7cf3d3d67130dd5aa9f78efacb6
BASIC_SIZE=512000000

cd "$TESTDIR"

# --- 1. A fresh image from `asiffs create` reads as zeros in dissect --------
log "create a 3G image"
"$ASIFFS" create fresh.asif --size 3G
[[ -f fresh.asif ]] || fail "create did not make fresh.asif"
assert_eq $((4 * MIB)) "$(stat -c %s fresh.asif)" "fresh image file size (Apple's are 4 chunks)"
assert_exit 0 "$ASIFFS" check fresh.asif
assert_cmd_fails "$ASIFFS" create fresh.asif --size 3G # exists, no --force
"$ASIFFS" create fresh.asif --size 3G --force

size="$("$PYTHON" "$DISSECT_READ" --info fresh.asif | python3 -c 'import json,sys; print(json.load(sys.stdin)["size"])')"
assert_eq $((3 * GIB)) "$size" "dissect's virtual size of fresh.asif"
"$PYTHON" "$DISSECT_READ" fresh.asif fresh-dissect.raw
assert_all_zero fresh-dissect.raw $((3 * GIB))

# --- 2. raw -> asif -> raw round trip, checked by dissect -------------------
seed="${INTEROP_SEED:-$RANDOM$RANDOM}"
log "random data with seed $seed (set INTEROP_SEED=$seed to replay)"
truncate -s $((3 * GIB)) raw.img
python3 - "$seed" raw.img <<'PY'
import random, sys
seed, path = int(sys.argv[1]), sys.argv[2]
rng = random.Random(seed)
GIB, MIB, size = 1 << 30, 1 << 20, 3 << 30
# fixed edge cases + random extents
extents = [
    (0, 512),                       # first sector
    (MIB - 100, 4095),              # unaligned, across a chunk boundary
    (5 * MIB, MIB),                 # exactly one whole chunk
    (GIB + 12345, 70000),           # unaligned, odd length
    (2 * GIB + 7 * 512, 3 * MIB),   # several chunks, sector-aligned start
    (size - 512, 512),              # last sector
]
for _ in range(8):
    length = rng.choice([1, 511, 512, 4096, 65537, MIB + 3])
    extents.append((rng.randrange(0, size - length), length))
with open(path, "r+b") as f:
    for off, length in extents:
        f.seek(off)
        f.write(rng.randbytes(length))
PY
assert_eq $((3 * GIB)) "$(stat -c %s raw.img)" "raw.img size"

log "convert raw.img -> conv.asif"
"$ASIFFS" convert raw.img conv.asif -O asif
assert_exit 0 "$ASIFFS" check conv.asif
"$ASIFFS" info conv.asif >/dev/null
"$ASIFFS" info conv.asif --json | python3 -c 'import json,sys; json.load(sys.stdin)' \
    || fail "info --json is not JSON"
"$ASIFFS" map conv.asif --json | python3 -c 'import json,sys; json.load(sys.stdin)' \
    || fail "map --json is not JSON"
conv_size="$(stat -c %s conv.asif)"
[[ $conv_size -lt $((64 * MIB)) ]] || fail "conv.asif is $conv_size bytes: sparse input should give a small image"
[[ $((conv_size % MIB)) -eq 0 ]] || fail "conv.asif size $conv_size is not a whole number of chunks"

log "dissect reads conv.asif"
"$PYTHON" "$DISSECT_READ" conv.asif conv-dissect.raw
assert_same_content raw.img conv-dissect.raw
assert_eq "$(sha256sum <raw.img | cut -d' ' -f1)" "$("$PYTHON" "$DISSECT_READ" --sha256 conv.asif)" \
    "dissect's sha256 of conv.asif"

log "convert conv.asif -> back.raw"
"$ASIFFS" convert conv.asif back.raw -O raw
assert_same_content raw.img back.raw
cmp raw.img back.raw || fail "cmp: back.raw differs from raw.img"

# --- 3. Apple's vectors: asiffs and dissect agree, and match the README ----
decompress_vectors vectors
for v in vectors/*.asif; do
    name="$(basename "$v" .asif)"
    log "vector $name"
    case "$name" in
        apple-basic) want_size=$BASIC_SIZE ;;
        apple-blank-*GB)
            gb="${name#apple-blank-}"
            gb="${gb%GB}"
            want_size=$((gb * 1000000000))
            ;;
        *) fail "unknown vector $name: add its expectations here" ;;
    esac

    assert_exit 0 "$ASIFFS" check "$v"
    "$ASIFFS" info "$v" --json | python3 -c 'import json,sys; json.load(sys.stdin)' \
        || fail "info --json of $name is not JSON"

    dsize="$("$PYTHON" "$DISSECT_READ" --info "$v" | python3 -c 'import json,sys; print(json.load(sys.stdin)["size"])')"
    assert_eq "$want_size" "$dsize" "dissect's virtual size of $name"

    timeout 300 "$ASIFFS" convert "$v" "$name.raw" -O raw \
        || fail "convert $name to raw failed or took over 300s (is the raw output sparse?)"
    assert_eq "$want_size" "$(stat -c %s "$name.raw")" "raw size of $name"

    "$PYTHON" "$DISSECT_READ" "$v" "$name.dissect.raw"
    assert_same_content "$name.dissect.raw" "$name.raw"

    if [[ $name == apple-basic ]]; then
        assert_eq "$BASIC_SHA" "$(sha256sum <"$name.raw" | cut -d' ' -f1)" "sha256 of asiffs's $name"
        assert_eq "$BASIC_SHA" "$("$PYTHON" "$DISSECT_READ" --sha256 "$v")" "sha256 of dissect's $name"
        # and back: asiffs re-encodes it, dissect still reads the same disk
        "$ASIFFS" convert "$name.raw" "$name.rt.asif" -O asif
        assert_exit 0 "$ASIFFS" check "$name.rt.asif"
        assert_eq "$BASIC_SHA" "$("$PYTHON" "$DISSECT_READ" --sha256 "$name.rt.asif")" \
            "dissect's sha256 of asiffs's re-encoding of $name"
    else
        assert_all_zero "$name.raw" "$want_size"
    fi
    rm -f "$name.raw" "$name.dissect.raw" "$name.rt.asif"
done

log "ok"
