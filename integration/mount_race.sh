#!/usr/bin/env bash
# The lost-write race: parallel direct random writes through a mount whose
# index cache holds a single chunk-group (--cache-tables 1), so groups are
# evicted and reloaded while other threads allocate into them. Every write
# must read back (fio verify), the unmounted image must check clean (exit 3,
# a leaked chunk, is a lost mapping too), and the data must survive a
# read-only remount. The race shows in about half the runs, so the whole
# sequence is repeated RACE_ROUNDS times (default 3) on fresh images.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
require_asiffs
command -v fio >/dev/null || fail "fio not installed (apt-get install fio)"

ROUNDS="${RACE_ROUNDS:-3}"
cd "$TESTDIR"
mkdir -p mnt src
# The container gets ~40,000 scattered 4 KiB extents; deleting that from a
# host filesystem mounted with online discard takes minutes, so the images
# live on a tmpfs (they use ~200 MiB of it). lib.sh's exit trap unmounts it.
mount -t tmpfs -o size=1g asiffs-race src || fail "cannot mount a tmpfs (needs root)"

# jobfile FILE RW EXTRA...: 4 jobs of 64 MiB of 4 KiB random I/O, one in
# each 16 GiB quarter of the disk; EXTRA lines go to [global]. randrepeat=1
# seeds every job the same way each run, and fio draws random offsets from
# the same generator for reads and writes, so a randread pass visits exactly
# the blocks the randwrite pass wrote and checks each one's verify header
# (magic, offset, crc32c): a block that reads zeros or holds another
# offset's data fails. (fio's verify_only opens the file read-write, which a
# read-only mount refuses, hence randread.)
jobfile() {
    local out="$1" rw="$2"
    shift 2
    {
        echo "[global]"
        echo "filename=mnt/r.img"
        echo "ioengine=libaio"
        echo "direct=1"
        echo "rw=$rw"
        echo "bs=4k"
        echo "iodepth=32"
        echo "size=16G"
        echo "io_size=64M"
        echo "randrepeat=1"
        echo "verify=crc32c"
        echo "verify_fatal=1"
        echo "verify_state_save=0"
        printf '%s\n' "$@"
        for i in 0 1 2 3; do
            printf '[q%d]\noffset=%dG\n' "$i" $((16 * i))
        done
    } >"$out"
}
jobfile write.fio randwrite "do_verify=1"
jobfile verify.fio randread

# run_fio JOBFILE LOG WHAT: fio must exit 0 and report no error.
run_fio() {
    local rc=0
    timeout 90 fio --output="$2" "$1" >/dev/null 2>"$2.err" || rc=$?
    [[ $rc -ne 124 ]] || fail "$3: fio did not finish within 90 s"
    if [[ $rc -ne 0 ]] || grep -q "err= *[1-9]" "$2"; then
        grep -h -m3 -iE "verify|bad|error|err=" "$2.err" "$2" >&2 || true
        fail "$3: fio exit $rc ($(grep -h -iE 'verify|bad|error' "$2.err" "$2" | head -n1))"
    fi
}

for round in $(seq 1 "$ROUNDS"); do
    rm -f src/r.asif
    "$ASIFFS" create src/r.asif --size 64G >/dev/null
    start=$SECONDS
    "$ASIFFS" mount src mnt --cache-tables 1 --threads 32
    run_fio write.fio "write$round.log" "round $round: write + verify"
    "$ASIFFS" umount mnt
    assert_check_clean src/r.asif "round $round: after a clean unmount"
    "$ASIFFS" mount src mnt -o ro
    run_fio verify.fio "verify$round.log" "round $round: verify after read-only remount"
    "$ASIFFS" umount mnt
    echo "PASS round $round: 4x64 MiB parallel random writes verified, check clean, verified again after remount ($((SECONDS - start))s)"
done
