#!/usr/bin/env bash
# SIGKILL the server, 20 times, in the middle of random 4 KiB and 64 KiB
# writes, punched holes and fsyncs. A killed process must leave no leaked
# chunk (docs/design.md promises it: the page cache survives, so only a
# power cut may leak), so `asiffs check` must exit 0, not 3. Every write and
# discard an fsync acknowledged must be there, unless a later operation on
# the same block (acknowledged or not) replaced it.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
require_asiffs

ROUNDS="${KILL_ROUNDS:-20}"
SIZE_MIB=256
cd "$TESTDIR"
mkdir -p src mnt
"$ASIFFS" create src/k.asif --size ${SIZE_MIB}M >/dev/null

# The writer. Every operation gets a sequence number, growing across rounds,
# and is logged BEFORE it is issued ("W blk nblk seq" or "D blk nblk seq");
# after each fsync that returns, "A seq" says every operation up to seq is
# durable. Each 4 KiB block written carries (block, seq) repeated.
cat >writer.py <<'PY'
import ctypes, mmap, os, random, struct, sys
path, log, seed, ready = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
rng = random.Random(seed)
BS, NBLK = 4096, (int(sys.argv[5]) << 20) // 4096
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
PUNCH = 0x02 | 0x01                               # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
hot = [rng.randrange(NBLK - 16) for _ in range(200)]  # rewritten often: ordering and chunk reuse
fd = os.open(path, os.O_RDWR | (os.O_DIRECT if seed % 2 else 0))
buf = mmap.mmap(-1, 16 * BS)                      # page aligned, for O_DIRECT
logf = open(log, "a")
seq, ops = seed * 10**7, 0
try:
    while True:
        seq += 1
        blk = rng.choice(hot) if rng.random() < 0.5 else rng.randrange(NBLK - 16)
        r = rng.random()
        if r < 0.15:                              # punch 4 KiB .. 2 MiB: frees whole chunks
            n = rng.choice((1, 3, 16, 256, 512))
            n = min(n, NBLK - blk)
            logf.write(f"D {blk} {n} {seq}\n"); logf.flush()
            if libc.fallocate(fd, PUNCH, blk * BS, n * BS) != 0:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e))
        else:
            n = 1 if r < 0.6 else 16
            buf.seek(0)
            for i in range(n):
                buf.write(struct.pack("<QQ", blk + i, seq) * (BS // 16))
            logf.write(f"W {blk} {n} {seq}\n"); logf.flush()
            if os.pwrite(fd, memoryview(buf)[: n * BS], blk * BS) != n * BS:
                raise OSError(0, "short write")
        ops += 1
        if ops % 16 == 0:
            os.fsync(fd)
            logf.write(f"A {seq}\n"); logf.flush()
            if ready:
                open(ready, "w").close(); ready = None
except OSError as e:
    print(f"writer stopped at seq {seq}: {e}", file=sys.stderr)
PY

# The verifier: for each block, the last acknowledged operation on it sets
# what it must hold; any later operation on it (acknowledged or not) may
# have replaced that. A write leaves (block, seq) stamps, a discard zeros.
cat >verify.py <<'PY'
import struct, sys
img, log = sys.argv[1], sys.argv[2]
R = 10**7                          # round r's sequence numbers are r*R+1, r*R+2, ...
ops, acked = [], {}                # acked: round -> highest acknowledged seq
for line in open(log):
    f = line.split()
    if f[0] == "A":
        s = int(f[1]); acked[s // R] = max(acked.get(s // R, 0), s)
    else:
        ops.append((int(f[3]), f[0], int(f[1]), int(f[2])))
is_acked = lambda s: s <= acked.get(s // R, 0)
hist = {}                          # block -> [(seq, kind)] in order
for seq, kind, blk, n in sorted(ops):
    for b in range(blk, blk + n):
        hist.setdefault(b, []).append((seq, kind))
zero = bytes(4096)
with open(img, "rb") as f:          # the whole image, in large reads
    disk = f.read()
bad = 0
for b, h in sorted(hist.items()):
    last = max((i for i, (s, _) in enumerate(h) if is_acked(s)), default=None)
    allowed = h[last:] if last is not None else [(0, "D")] + h   # never acked: zeros or any
    data = disk[b * 4096:(b + 1) * 4096]
    if any(data == (zero if k == "D" else struct.pack("<QQ", b, s) * 256) for s, k in allowed):
        continue
    bad += 1
    if bad <= 5:
        got = "zeros" if data == zero else "blk=%d seq=%d" % struct.unpack_from("<QQ", data)
        print(f"block {b}: found {got}; allowed (seq, op) {allowed[:4]}{' ...' if len(allowed) > 4 else ''}")
n_acked = sum(1 for s, *_ in ops if is_acked(s))
print(f"{len(hist)} blocks checked, {n_acked} of {len(ops)} operations acknowledged, {bad} bad")
sys.exit(1 if bad else 0)
PY

: >ops.log
start=$SECONDS
for round in $(seq 1 "$ROUNDS"); do
    "$ASIFFS" mount src mnt
    pid="$(python3 -c 'import os; print(os.getxattr("mnt", "user.asiffs.pid").decode())')"
    rm -f ready
    python3 writer.py mnt/k.img ops.log "$round" ready $SIZE_MIB 2>"writer$round.err" &
    wpid=$!
    # Load runs until the first fsync returned, then a random 0.5-2 s more.
    for ((i = 0; i < 200; i++)); do
        [[ ! -e ready ]] && kill -0 "$wpid" 2>/dev/null || break
        sleep 0.05
    done
    [[ -e ready ]] || { kill "$wpid" 2>/dev/null; fail "round $round: no fsync returned within 10 s ($(cat "writer$round.err"))"; }
    sleep "$(python3 -c 'import random; print(round(random.uniform(0.5, 2), 2))')"
    kill -KILL "$pid"
    wait "$wpid" || true
    fusermount3 -u -z mnt 2>/dev/null || umount -l mnt
    for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done

    # Corruption stops the round at once; leaks (exit 3) only after the data
    # is checked too, so that a failing run tells both.
    rc=0
    image_check src/k.asif || rc=$?
    if [[ $rc -ne 0 && $rc -ne 3 ]]; then
        cat "$TESTDIR/check.out" >&2
        fail "round $round: asiffs check exit $rc after SIGKILL: $(check_why)"
    fi
    why="$(check_why)"
    "$ASIFFS" mount src mnt -o ro
    python3 verify.py mnt/k.img ops.log >"verify$round.txt" ||
        { cat "verify$round.txt" >&2; fail "round $round: acknowledged writes or discards lost: $(tail -n1 "verify$round.txt")"; }
    "$ASIFFS" umount mnt
    [[ $rc -eq 0 ]] || fail "round $round: asiffs check exit 3 after SIGKILL, leaks a killed process must not leave ($why; acknowledged data intact: $(tail -n1 "verify$round.txt"))"
    echo "PASS round $round: SIGKILL; check clean; $(tail -n1 "verify$round.txt")"
done
echo "PASS $ROUNDS rounds of SIGKILL under writes, discards and fsyncs ($((SECONDS - start))s)"
