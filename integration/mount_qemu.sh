#!/usr/bin/env bash
# QEMU's view: qemu-img compare of the exposed file against a raw copy, then
# random writes, zero-writes and discards through qemu-io with O_DIRECT
# (-t none, as QEMU cache=none does), mirrored on the raw copy.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
require_asiffs
command -v qemu-io >/dev/null || fail "qemu-io missing (qemu-utils)"

MIB=$((1 << 20))
SIZE=$((1 << 30))
cd "$TESTDIR"
mkdir -p src mnt
gzip -dc "$VECTORS/apple-basic.asif.gz" >src/basic.asif
"$ASIFFS" create src/q.asif --size 1G
"$ASIFFS" mount src mnt

# Some initial data, then the raw copy.
head -c $((3 * MIB)) /dev/urandom | dd of=mnt/q.img bs=1M seek=10 conv=notrunc status=none
head -c 12345 /dev/urandom | dd of=mnt/q.img bs=1 seek=$((700 * MIB + 3)) conv=notrunc status=none
cp --sparse=always mnt/q.img raw.img
cp --sparse=always mnt/basic.img basic.raw
qemu-img compare -f raw -F raw mnt/q.img raw.img || fail "qemu-img compare q.img"
qemu-img compare -f raw -F raw mnt/basic.img basic.raw || fail "qemu-img compare basic.img"
echo "PASS qemu-img compare of exposed files against raw copies"

seed="${QEMU_SEED:-$RANDOM}"
log "seed $seed (QEMU_SEED=$seed replays)"
python3 - "$seed" "$SIZE" >cmds.txt <<'PY'
import random, sys
rng = random.Random(int(sys.argv[1])); size = int(sys.argv[2])
for i in range(60):
    kind = rng.random()
    if rng.random() < 0.5:   # sector aligned, as a guest issues them
        off = rng.randrange(0, size // 512) * 512
        ln = rng.choice([512, 4096, 65536, 1 << 20, 3 << 20]) + rng.randrange(0, 8) * 512
    else:                    # unaligned: qemu bounces them through aligned buffers
        off = rng.randrange(0, size); ln = rng.randrange(1, 300000)
    ln = min(ln, size - off)
    if kind < 0.7:
        print(f"write -P 0x{rng.randrange(1, 256):02x} {off} {ln}")
    elif kind < 0.85:
        print(f"write -z {off} {ln}")
    else:
        print(f"discard {off} {ln}")
PY
args=()
while read -r c; do args+=(-c "$c"); done <cmds.txt
qemu-io -f raw -t none "${args[@]}" mnt/q.img >qemu-io.log || fail "qemu-io -t none on the exposed file"
grep -qi "error\|failed" qemu-io.log && fail "qemu-io reported errors: $(grep -i 'error\|failed' qemu-io.log | head -3)"
qemu-io -f raw "${args[@]}" raw.img >/dev/null || fail "qemu-io on the raw copy"
qemu-img compare -f raw -F raw mnt/q.img raw.img || fail "compare after qemu-io writes"
echo "PASS $(wc -l <cmds.txt) qemu-io writes/zeroes/discards with -t none, contents match"

"$ASIFFS" umount mnt
assert_exit 0 "$ASIFFS" check src/q.asif
"$ASIFFS" mount src mnt -o ro
qemu-img compare -f raw -F raw mnt/q.img raw.img || fail "compare after remount"
qemu-io -f raw -r -t none -c "read 0 1M" mnt/q.img >/dev/null || fail "O_DIRECT read on a read-only mount"
"$ASIFFS" umount mnt
echo "PASS after remount: image checks clean, contents match"
