#!/usr/bin/env bash
# FUSE passthrough for raw disks: a raw UDRW .dmg is its file byte for byte,
# so the mount hands its reads and writes to the kernel, which does them on
# the .dmg itself. Checked:
# - `asiffs stats` says "passthrough": true, and after fio writes and
#   verifies through the mount (direct and buffered) the daemon has served
#   no read and no write of it, while the data is exact in the .dmg;
# - what still comes to asiffs works alongside: TRIM punches the .dmg,
#   SEEK_DATA/SEEK_HOLE see the hole, truncate grows it, fsync;
# - an ASIF image in the same mount is served as before;
# - -o passthrough=off serves the same .dmg through the daemon.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
require_asiffs
command -v fio >/dev/null || fail "fio not installed (apt-get install fio)"

MiB=$((1 << 20))
cd "$TESTDIR"
mkdir -p src mnt
"$ASIFFS" create src/raw.dmg --size 256M >/dev/null
"$ASIFFS" create src/vm.asif --size 64M >/dev/null
"$ASIFFS" mount src mnt --log "$TESTDIR/mount.log" 2>mount.err || fail "mount: $(cat mount.err)"
mountpoint -q mnt || fail "mount did not appear"

stat_of() { "$ASIFFS" stats mnt "$1" | python3 -c "import json,sys; print(json.load(sys.stdin)[sys.argv[1]])" "$2"; }

for direct in 1 0; do
    fio --name=pt --filename=mnt/raw.img --rw=randwrite --bs=4k --size=64M --offset=$((64 * MiB)) \
        --ioengine=libaio --iodepth=16 --direct=$direct --verify=crc32c --do_verify=1 \
        --verify_fatal=1 --randrepeat=0 --output=fio-$direct.out >/dev/null 2>fio-$direct.err \
        || fail "fio direct=$direct through passthrough: $(cat fio-$direct.err fio-$direct.out | tail -5)"
done
assert_eq True "$(stat_of raw passthrough)" "stats passthrough of raw.img"
assert_eq 0 "$(stat_of raw reads)" "reads the daemon served for raw.img"
assert_eq 0 "$(stat_of raw writes)" "writes the daemon served for raw.img"
cmp <(dd if=mnt/raw.img bs=1M skip=64 count=64 status=none) <(dd if=src/raw.dmg bs=1M skip=64 count=64 status=none) \
    || fail "the mount and the .dmg differ"
echo "PASS fio verify (direct and buffered) through passthrough; the daemon served no read or write"

# Several opens of one image at once share its one backing registration
# (the kernel refuses a second backing file for an inode with EBUSY).
fio --name=a --filename=mnt/raw.img --rw=randwrite --bs=4k --size=16M --offset=0 --direct=1 \
    --ioengine=libaio --iodepth=8 --verify=crc32c --verify_fatal=1 --randrepeat=0 \
    --name=b --filename=mnt/raw.img --rw=write --bs=3584 --size=8M --offset=$((32 * MiB)) --direct=0 \
    --ioengine=psync --verify=crc32c --verify_fatal=1 \
    --output=fio-both.out >/dev/null 2>fio-both.err \
    || fail "two concurrent opens through passthrough: $(cat fio-both.err; grep -E 'err=' fio-both.out)"
assert_eq 2 "$(grep -c 'err= 0' fio-both.out)" "jobs that finished without error"
assert_eq 0 "$(stat_of raw reads)" "reads the daemon served for raw.img after concurrent opens"
echo "PASS two concurrent opens (direct and buffered, unaligned) share the passthrough backing file"

# What passthrough leaves to asiffs: TRIM, SEEK_DATA/SEEK_HOLE, truncate, fsync.
sync
before=$(du -k src/raw.dmg | cut -f1)
fallocate -p -o $((64 * MiB)) -l $((32 * MiB)) mnt/raw.img
after=$(du -k src/raw.dmg | cut -f1)
[[ $((before - after)) -ge $((31 * 1024)) ]] || fail "punching 32 MiB freed only $((before - after)) KiB"
python3 - mnt/raw.img <<'PY' || fail "SEEK_DATA/SEEK_HOLE after the punch"
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
MiB = 1 << 20
assert os.lseek(fd, 64 * MiB, os.SEEK_HOLE) == 64 * MiB
assert os.lseek(fd, 64 * MiB, os.SEEK_DATA) == 96 * MiB, os.lseek(fd, 64 * MiB, os.SEEK_DATA)
assert os.pread(fd, 4096, 70 * MiB) == bytes(4096)
PY
truncate -s 512M mnt/raw.img
assert_eq $((512 * MiB)) "$(stat -c %s mnt/raw.img)" "size after truncate through the mount"
assert_eq $((512 * MiB)) "$(stat -c %s src/raw.dmg)" "size of the .dmg after truncate"
printf 'tail' | dd of=mnt/raw.img bs=1 seek=$((512 * MiB - 4)) conv=notrunc,fsync status=none
assert_eq tail "$(tail -c 4 src/raw.dmg)" "the last bytes of the .dmg"
echo "PASS TRIM, SEEK_DATA/SEEK_HOLE, truncate and fsync work beside passthrough"

dd if=/dev/urandom of=pattern bs=1M count=4 status=none
dd if=pattern of=mnt/vm.img bs=1M seek=8 conv=notrunc,fsync status=none
cmp <(dd if=mnt/vm.img bs=1M skip=8 count=4 status=none) pattern || fail "vm.img (ASIF) reads back differently"
[[ "$(stat_of vm writes)" -gt 0 ]] || fail "the ASIF image's writes did not reach asiffs"
"$ASIFFS" umount mnt || fail "umount"
echo "PASS the ASIF image in the same mount is served by asiffs"

"$ASIFFS" mount src mnt -o passthrough=off --log "$TESTDIR/mount2.log" 2>mount2.err || fail "mount: $(cat mount2.err)"
cmp <(dd if=mnt/raw.img bs=1M skip=96 count=32 status=none) <(dd if=src/raw.dmg bs=1M skip=96 count=32 status=none) \
    || fail "passthrough=off reads differently"
assert_eq False "$(stat_of raw passthrough)" "stats passthrough with -o passthrough=off"
[[ "$(stat_of raw reads)" -gt 0 ]] || fail "with passthrough off the daemon served no read"
"$ASIFFS" umount mnt || fail "umount"
echo "PASS -o passthrough=off serves the .dmg through asiffs"
