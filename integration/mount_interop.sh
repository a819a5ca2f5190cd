#!/usr/bin/env bash
# Images asiffs creates in each Apple format (`asiffs create`), written
# through the mount with random unaligned writes and punches, then read by
# readers that share no code with asiffs:
# - UDIF .dmg (`--format udif`, with a trailer): libyal's libmodi (pymodi)
#   and qemu-img's dmg driver;
# - raw UDRW .dmg (what `create x.dmg` and hdiutil make): the file itself;
# - .sparseimage (64 bands of 1 MiB, within libmodi's 1008): pymodi;
# - .sparsebundle: a reader written here from ../shared/apple-formats.md §3
#   (band n in bands/<n in lowercase hex>, absent or short bands read as
#   zeros; libmodi expects zero-padded names and misreads real bundles).
# Each must equal a raw model file that took the same writes and punches.
# Punching 16 MiB frees at least 15 MiB of host space in each container
# (du), and `asiffs check` finds each clean after the unmount.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
require_asiffs
"$PYTHON" -c 'import pymodi' 2>/dev/null || fail "$PYTHON cannot import pymodi (run make deps)"
command -v qemu-img >/dev/null || fail "qemu-img not installed"
MODI_READ="$REPO_ROOT/tests/interop/modi_read.py"

MiB=$((1 << 20))
SIZE=$((64 * MiB))
seed="${INTEROP_SEED:-$RANDOM$RANDOM}"
log "random writes with seed $seed (set INTEROP_SEED=$seed to replay)"
cd "$TESTDIR"
mkdir -p src mnt

"$ASIFFS" create src/rw.dmg --size 64M --format udif >/dev/null
"$ASIFFS" create src/raw.dmg --size 64M >/dev/null
"$ASIFFS" create src/sp.sparseimage --size 64M >/dev/null
"$ASIFFS" create src/sb.sparsebundle --size 64M --band-size 1M >/dev/null
"$ASIFFS" mount src mnt --log "$TESTDIR/mount.log" 2>mount.err || fail "mount: $(cat mount.err)"
mountpoint -q mnt || fail "mount did not appear"
assert_eq "raw.img rw.img sb.img sp.img" "$(ls mnt | tr '\n' ' ' | sed 's/ $//')" "names in the mount"

# io.py IMAGE MODEL SEED: the same random unaligned writes and punches on
# the mounted image and on a raw model file, then fsync of both.
cat >io.py <<'PY'
import ctypes, os, random, sys

PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

def punch(fd, off, length):
    if libc.fallocate(fd, PUNCH, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"fallocate punch {off}+{length}: {os.strerror(e)}")

image, model, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(seed)
size = os.path.getsize(image)
fds = [os.open(image, os.O_RDWR), os.open(model, os.O_RDWR)]
for _ in range(120):
    length = rng.choice([1, 511, 513, 4096, 65537, 300000, 1 << 20, 3 << 20])
    off = rng.randrange(0, size - length)
    if rng.random() < 0.75:
        data = rng.randbytes(length)
        for fd in fds:
            assert os.pwrite(fd, data, off) == length
    else:
        for fd in fds:
            punch(fd, off, length)
for fd in fds:
    os.fsync(fd)
    os.close(fd)
PY

usage_kib() { du -sk "$1" | cut -f1; }
for img in raw rw sp sb; do
    truncate -s "$SIZE" "model-$img.raw"
    python3 io.py "mnt/$img.img" "model-$img.raw" "$seed" || fail "$img: writes through the mount"
    cmp "mnt/$img.img" "model-$img.raw" || fail "$img: the mount reads differently from the model"
    echo "PASS $img: random unaligned writes and punches through the mount read back as the model"
done
for img in raw:src/raw.dmg rw:src/rw.dmg sp:src/sp.sparseimage sb:src/sb.sparsebundle; do
    name="${img%%:*}" container="${img#*:}"
    dd if=/dev/urandom of=pattern bs=1M count=16 status=none
    dd if=pattern of="mnt/$name.img" bs=1M seek=32 conv=notrunc,fsync status=none
    dd if=pattern of="model-$name.raw" bs=1M seek=32 conv=notrunc status=none
    sync
    before=$(usage_kib "$container")
    fallocate -p -o $((32 * MiB)) -l $((16 * MiB)) "mnt/$name.img"
    fallocate -p -o $((32 * MiB)) -l $((16 * MiB)) "model-$name.raw"
    sync
    after=$(usage_kib "$container")
    [[ $((before - after)) -ge $((15 * 1024)) ]] \
        || fail "$name: punching 16 MiB freed only $((before - after)) KiB ($before -> $after)"
    cmp "mnt/$name.img" "model-$name.raw" || fail "$name: differs from the model after the punch"
    echo "PASS $name: punching 16 MiB freed $((before - after)) KiB of $container"
done
"$ASIFFS" umount mnt || fail "umount"

for c in raw.dmg rw.dmg sp.sparseimage sb.sparsebundle; do
    "$ASIFFS" check "src/$c" >"check-$c.out" 2>&1 || fail "check src/$c: $(cat "check-$c.out")"
done
echo "PASS asiffs check: all four clean"

cmp src/raw.dmg model-raw.raw || fail "raw.dmg is not the disk byte for byte"
[[ "$(stat -c %s src/raw.dmg)" == "$SIZE" ]] || fail "raw.dmg has a trailer or a wrong length"
echo "PASS raw UDRW written through the mount: the .dmg is the disk byte for byte"

"$PYTHON" "$MODI_READ" src/rw.dmg rw.modi >/dev/null || fail "pymodi cannot read rw.dmg"
cmp rw.modi model-rw.raw || fail "pymodi reads rw.dmg differently from the model"
qemu-img convert -f dmg -O raw src/rw.dmg rw.qemu || fail "qemu-img cannot read rw.dmg"
cmp rw.qemu model-rw.raw || fail "qemu-img reads rw.dmg differently from the model"
echo "PASS UDRW written through the mount: pymodi and qemu-img read it as the model"

"$PYTHON" "$MODI_READ" src/sp.sparseimage sp.modi >/dev/null || fail "pymodi cannot read sp.sparseimage"
cmp sp.modi model-sp.raw || fail "pymodi reads sp.sparseimage differently from the model"
echo "PASS .sparseimage written through the mount: pymodi reads it as the model"

python3 - src/sb.sparsebundle sb.spec <<'PY' || fail "the spec reader rejects sb.sparsebundle"
import os, plistlib, re, sys
bundle, out = sys.argv[1], sys.argv[2]
with open(os.path.join(bundle, "Info.plist"), "rb") as f:
    info = plistlib.load(f)
with open(os.path.join(bundle, "Info.bckup"), "rb") as f:
    assert plistlib.load(f) == info, "Info.bckup differs from Info.plist"
assert info["diskimage-bundle-type"] == "com.apple.diskimage.sparsebundle", info
assert info["bundle-backingstore-version"] == 1, info
size, band = info["size"], info["band-size"]
names = os.listdir(os.path.join(bundle, "bands"))
for n in names:
    assert re.fullmatch(r"0|[1-9a-f][0-9a-f]*", n), f"band name {n!r} is not unpadded lowercase hex"
    assert int(n, 16) * band < size, f"band {n} past the end"
    assert os.path.getsize(os.path.join(bundle, "bands", n)) <= band, f"band {n} longer than a band"
with open(out, "wb") as o:
    for k in range((size + band - 1) // band):
        want = min(band, size - k * band)
        try:
            with open(os.path.join(bundle, "bands", format(k, "x")), "rb") as f:
                b = f.read(want)
        except FileNotFoundError:
            b = b""
        o.write(b + bytes(want - len(b)))
PY
cmp sb.spec model-sb.raw || fail "the spec reader reads sb.sparsebundle differently from the model"
echo "PASS .sparsebundle written through the mount: read from the documented layout as the model"
