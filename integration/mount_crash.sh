#!/usr/bin/env bash
# SIGKILL the server in the middle of a write load with periodic fsync.
# Afterwards `asiffs check` must find nothing wrong, not even a leaked chunk
# (a killed process, unlike a power cut, leaves none), and every write
# acknowledged by an fsync that returned must be there.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
require_asiffs

cd "$TESTDIR"
mkdir -p src mnt
"$ASIFFS" create src/c.asif --size 256M

# The writer: 4 KiB blocks, each stamped with (block, sequence); after every
# fsync that returns it logs the stamps that fsync covered.
cat >writer.py <<'PY'
import os, random, struct, sys
path, log, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(seed)
BS, NBLK = 4096, (256 << 20) // 4096
hot = [rng.randrange(NBLK) for _ in range(300)]  # rewritten often: tests ordering
fd = os.open(path, os.O_RDWR | (os.O_DIRECT if seed % 2 else 0))
buf = bytearray(BS); mv = memoryview(buf)
import mmap
abuf = mmap.mmap(-1, BS)                          # page aligned, for O_DIRECT
logf = open(log, "a")
seq, pending = seed * 10**9, []   # sequences grow across rounds
try:
    while True:
        blk = rng.choice(hot) if rng.random() < 0.5 else rng.randrange(NBLK)
        seq += 1
        stamp = struct.pack("<QQ", blk, seq) * (BS // 16)
        abuf.seek(0); abuf.write(stamp)
        os.pwrite(fd, abuf, blk * BS)
        pending.append((blk, seq))
        if len(pending) >= 16:
            os.fsync(fd)
            logf.write("".join(f"{b} {s}\n" for b, s in pending)); logf.flush(); os.fsync(logf.fileno())
            pending = []
except OSError as e:
    print(f"writer stopped after {seq} writes: {e}", file=sys.stderr)
PY

for round in 1 2 3; do
    "$ASIFFS" mount src mnt
    pid="$(python3 -c 'import os; print(os.getxattr("mnt", "user.asiffs.pid").decode())')"
    : >"acked$round.log"
    python3 writer.py mnt/c.img "acked$round.log" "$round" 2>"writer$round.err" &
    wpid=$!
    sleep "$((1 + round))"
    kill -KILL "$pid"
    wait "$wpid" || true
    fusermount3 -u -z mnt 2>/dev/null || umount -l mnt
    acked=$(wc -l <"acked$round.log")
    [[ $acked -gt 0 ]] || fail "round $round: no write was acknowledged ($(cat "writer$round.err"))"

    rc=0
    "$ASIFFS" check src/c.asif >"check$round.txt" 2>&1 || rc=$?
    case $rc in
    0) log "round $round: check clean" ;;
    *) cat "check$round.txt" >&2; fail "round $round: asiffs check exit $rc after SIGKILL" ;;
    esac

    "$ASIFFS" mount src mnt -o ro
    python3 - mnt/c.img acked*.log <<'PY' || fail "round $round: acknowledged writes lost"
import struct, sys
fd = open(sys.argv[1], "rb")
latest = {}
for log in sys.argv[2:]:          # every round's acks hold unless a later write replaced them
    for line in open(log):
        b, s = map(int, line.split())
        latest[b] = max(latest.get(b, 0), s)
bad = 0
for b, s in latest.items():
    fd.seek(b * 4096); data = fd.read(4096)
    blk, seq = struct.unpack_from("<QQ", data)
    ok = data == struct.pack("<QQ", blk, seq) * 256 and blk == b
    # a later, unacknowledged write may have landed too: hence >=
    if not ok or seq < s:
        bad += 1
        if bad < 5:
            print(f"block {b}: want seq >= {s}, found blk={blk} seq={seq} ok={ok}")
print(f"{len(latest)} acknowledged blocks checked, {bad} bad")
sys.exit(1 if bad else 0)
PY
    "$ASIFFS" umount mnt
    echo "PASS round $round: SIGKILL after $acked acknowledged writes; check exit $rc; all acknowledged writes present"
done
