#!/usr/bin/env bash
# Data integrity in both container cache modes (-o cache=none: guest data
# with O_DIRECT on the container; -o cache=writeback: through the host page
# cache). In each: fio writes and verifies random 4 KiB and sequential
# 1 MiB I/O, direct and buffered, at once; the image is unmounted, the host
# cache dropped (cold) and every block verified again through a fresh
# read-only mount, then once more with the cache warm; check stays clean.
# The write pass runs twice, so the second rewrites mapped chunks: with
# --aio uring (the default) those writes, and the reads, go through
# io_uring; --aio threads covers the blocking fallback.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
require_asiffs
command -v fio >/dev/null || fail "fio not installed (apt-get install fio)"

cd "$TESTDIR"
mkdir -p mnt src

# jobfile FILE RW...: one job per kind of I/O, each on its own 256 MiB
# region of the disk; randrepeat makes the read pass visit exactly the
# blocks the write pass wrote and check each one's header and crc32c.
jobfile() {
    local out="$1" seqrw="$2" randrw="$3" verify="$4"
    cat >"$out" <<JOB
[global]
filename=mnt/c.img
ioengine=libaio
size=256M
randrepeat=1
verify=crc32c
verify_fatal=1
verify_state_save=0
do_verify=$verify
[rand-direct]
direct=1
rw=$randrw
bs=4k
iodepth=16
io_size=32M
offset=0
[seq-direct]
direct=1
rw=$seqrw
bs=1M
iodepth=8
offset=256M
[rand-buffered]
direct=0
rw=$randrw
bs=4k
io_size=16M
offset=512M
[unaligned-buffered]
direct=0
rw=$seqrw
bs=3584
size=8M
offset=768M
JOB
}
jobfile write.fio write randwrite 1
jobfile read.fio read randread 0

run_fio() {
    local rc=0
    timeout 120 fio --output="$2" "$1" >/dev/null 2>"$2.err" || rc=$?
    if [[ $rc -ne 0 ]] || grep -q "err= *[1-9]" "$2"; then
        grep -h -m3 -iE "verify|bad|error|err=" "$2.err" "$2" >&2 || true
        fail "$3: fio exit $rc"
    fi
}

for combo in none:uring writeback:uring none:threads; do
    mode="${combo%:*}" aio="${combo#*:}"
    rm -f src/c.asif
    "$ASIFFS" create src/c.asif --size 2G >/dev/null
    "$ASIFFS" mount src mnt -o "cache=$mode" --aio "$aio"
    want=blocking
    [[ $aio == uring ]] && want=io_uring
    got=$("$ASIFFS" stats mnt c | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["cache"], s["io"])')
    assert_eq "$got" "$mode $want" "cache mode and I/O in effect"
    run_fio write.fio "write-$combo.log" "$combo: write + verify"
    run_fio write.fio "rewrite-$combo.log" "$combo: rewrite + verify"
    "$ASIFFS" umount mnt
    assert_check_clean src/c.asif "$combo: after unmount"
    sync
    echo 3 >/proc/sys/vm/drop_caches
    "$ASIFFS" mount src mnt -o "ro,cache=$mode" --aio "$aio"
    run_fio read.fio "cold-$combo.log" "$combo: cold verify"
    run_fio read.fio "warm-$combo.log" "$combo: warm verify"
    "$ASIFFS" umount mnt
    echo "PASS cache=$mode aio=$aio: direct, buffered and unaligned writes and rewrites verified, then cold and warm after remount; check clean"
done
