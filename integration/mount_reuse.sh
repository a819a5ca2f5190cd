#!/usr/bin/env bash
# Space freed in one session is reused in the next: write 512 MiB, punch it
# all and unmount; a second session writes 512 MiB elsewhere. The container
# must not have grown past ~600 MiB (no reuse would make it ~1 GiB), must
# check clean, and must read back exactly: the second data where it was
# written, zeros everywhere else.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
require_asiffs

MIB=$((1 << 20))
cd "$TESTDIR"
mkdir -p src mnt
"$ASIFFS" create src/u.asif --size 4G >/dev/null
python3 -c '
import random, sys
for name, seed in (("data1", 1), ("data2", 2)):
    rng = random.Random(seed)
    with open(name, "wb") as f:
        for _ in range(512):
            f.write(rng.randbytes(1 << 20))
'

"$ASIFFS" mount src mnt
dd if=data1 of=mnt/u.img bs=1M oflag=direct conv=notrunc,fsync status=none || fail "session 1: writing 512 MiB"
cmp -n $((512 * MIB)) data1 mnt/u.img || fail "session 1: the 512 MiB just written read back differently"
fallocate --punch-hole -o 0 -l $((512 * MIB)) mnt/u.img || fail "session 1: punching the 512 MiB"
python3 -c 'import os, sys; fd = os.open(sys.argv[1], os.O_RDWR); os.fsync(fd)' mnt/u.img || fail "session 1: fsync after punch"
"$ASIFFS" umount mnt
len1=$(stat -c %s src/u.asif)
echo "PASS session 1: 512 MiB written, read back, punched; container length $((len1 / MIB)) MiB"

"$ASIFFS" mount src mnt
dd if=data2 of=mnt/u.img bs=1M seek=2048 oflag=direct conv=notrunc,fsync status=none || fail "session 2: writing 512 MiB at 2 GiB"
"$ASIFFS" umount mnt
len2=$(stat -c %s src/u.asif)
[[ $len2 -le $((600 * MIB)) ]] ||
    fail "container is $((len2 / MIB)) MiB after 512 MiB freed in session 1 and 512 MiB written in session 2 (want <= 600 MiB: freed chunks not reused across sessions)"
echo "PASS session 2: 512 MiB written elsewhere; container length $((len1 / MIB)) -> $((len2 / MIB)) MiB (<= 600)"

assert_check_clean src/u.asif "after two sessions"
truncate -s 4G ref.raw
dd if=data2 of=ref.raw bs=1M seek=2048 conv=notrunc status=none
"$ASIFFS" mount src mnt -o ro
assert_same_content mnt/u.img ref.raw
# Read the punched range in full too, not only where SEEK_DATA says data is.
cmp -n $((512 * MIB)) /dev/zero mnt/u.img || fail "the range punched in session 1 does not read as zeros"
"$ASIFFS" umount mnt
echo "PASS check clean; the image reads exactly the second 512 MiB at 2 GiB and zeros elsewhere"
