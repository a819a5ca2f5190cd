#!/usr/bin/env bash
# The host filesystem fills up: a 1 GiB image on a 64 MiB tmpfs. Writing
# 1 MiB at a time, each fsynced, must end in ENOSPC (not EIO, not a dead
# mount); everything fsynced before reads back; once some written ranges
# are punched and fsynced, writes succeed again. After unmounting, the image
# checks clean (exit 0: the write that failed must not leave a leaked chunk)
# and reads exactly what was acknowledged.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
require_asiffs

cd "$TESTDIR"
mkdir -p src mnt
mount -t tmpfs -o size=64m asiffs-enospc src || fail "cannot mount a tmpfs (needs root)"
# lib.sh's exit trap unmounts everything below $TESTDIR, deepest first: the
# FUSE mount, then this tmpfs.
"$ASIFFS" create src/e.asif --size 1G >/dev/null
"$ASIFFS" mount src mnt --log "$TESTDIR/daemon.log"

# io.py fill|refill|verify IMG STATE: the writer and the checker. Each MiB
# written holds (MiB index, phase) repeated. STATE (JSON) records what was
# acknowledged, punched and rewritten.
cat >io.py <<'PY'
import ctypes, errno, json, mmap, os, struct, sys
cmd, img, state = sys.argv[1], sys.argv[2], sys.argv[3]
MIB, N = 1 << 20, 1024
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
buf = mmap.mmap(-1, MIB)

def pattern(i, phase):
    return struct.pack("<QQ", i, phase) * (MIB // 16)

def write_whole(fd, i):
    # A write split into several FUSE requests (the ring's are 256 KiB)
    # that runs out of space part way returns what landed; the rest must
    # then fail with ENOSPC, as a retrying writer (dd, QEMU) would see.
    done = 0
    while done < MIB:
        n = os.pwrite(fd, memoryview(buf)[done:], i * MIB + done)
        if n <= 0 or n % 4096:
            sys.exit(f"MiB {i}: write returned {n} after {done} bytes")
        done += n

def write_synced(fd, i, phase):
    """Write MiB i and fsync; return which call failed with ENOSPC, or None."""
    buf.seek(0); buf.write(pattern(i, phase))
    for call, f in (("write", lambda: write_whole(fd, i)),
                    ("fsync", lambda: os.fsync(fd))):
        try:
            f()
        except OSError as e:
            if e.errno != errno.ENOSPC:
                sys.exit(f"MiB {i}: {call} failed with {e}, expected ENOSPC or success")
            return call
    return None

def load():
    return json.load(open(state))

if cmd == "fill":        # write + fsync MiB after MiB until ENOSPC
    fd = os.open(img, os.O_RDWR | os.O_DIRECT)
    acked = []
    for i in range(N):
        failed = write_synced(fd, i, 1)
        if failed:
            break
        acked.append(i)
    else:
        sys.exit(f"wrote all {N} MiB on a 64 MiB filesystem without ENOSPC")
    # While full, overwriting a chunk that is already there needs no space.
    last = acked[-1]
    if write_synced(fd, last, 3):
        sys.exit(f"with the filesystem full, overwriting MiB {last} in place got ENOSPC")
    json.dump({"acked": acked, "failed": i, "overwritten": [last]}, open(state, "w"))
    print(f"{len(acked)} MiB acknowledged, then ENOSPC from {failed} at MiB {i}; overwriting MiB {last} in place still works")
elif cmd == "refill":    # punch every other acknowledged MiB, fsync, write again
    st = load()
    fd = os.open(img, os.O_RDWR | os.O_DIRECT)
    punched = st["acked"][::2]
    for i in punched:
        if libc.fallocate(fd, 3, i * MIB, MIB) != 0:   # PUNCH_HOLE | KEEP_SIZE
            sys.exit(f"punching MiB {i}: {os.strerror(ctypes.get_errno())}")
    os.fsync(fd)
    # the failed MiB first (its content is unspecified until rewritten), then onwards
    rewritten = list(range(st["failed"], st["failed"] + len(punched) // 2))
    for i in rewritten:
        if write_synced(fd, i, 2):
            sys.exit(f"after punching {len(punched)} MiB and fsync, writing MiB {i} still got ENOSPC")
    st.update(punched=punched, rewritten=rewritten)
    json.dump(st, open(state, "w"))
    print(f"punched {len(punched)} MiB; {len(rewritten)} MiB written again")
elif cmd == "verify":    # every MiB of the image holds exactly what it should
    st = load()
    want = {i: 1 for i in st["acked"]}
    want.update({i: 3 for i in st["overwritten"]})
    want.update({i: 0 for i in st.get("punched", [])})
    want.update({i: 2 for i in st.get("rewritten", [])})
    skip = set() if "rewritten" in st else {st["failed"]}
    fd = os.open(img, os.O_RDONLY)
    zero = bytes(MIB)
    bad = []
    for i in range(N):
        if i in skip:
            continue
        data = os.pread(fd, MIB, i * MIB)
        if data != (pattern(i, want[i]) if want.get(i) else zero):
            bad.append(i)
    if bad:
        sys.exit(f"{len(bad)} MiB differ, first ones {bad[:8]} (want phase {[want.get(i, 0) for i in bad[:8]]})")
    print(f"all {N} MiB read back exactly")
PY

python3 io.py fill mnt/e.img state.json >fill.txt 2>&1 || fail "filling: $(tail -n1 fill.txt)"
echo "PASS fill: $(cat fill.txt)"
python3 io.py verify mnt/e.img state.json >v1.txt 2>&1 || fail "after ENOSPC, acknowledged data: $(tail -n1 v1.txt)"
echo "PASS after ENOSPC the mount still serves: $(cat v1.txt)"
python3 io.py refill mnt/e.img state.json >refill.txt 2>&1 || fail "$(tail -n1 refill.txt)"
echo "PASS freeing space: $(cat refill.txt)"
"$ASIFFS" umount mnt

assert_check_clean src/e.asif "after ENOSPC and recovery"
"$ASIFFS" mount src mnt -o ro
python3 io.py verify mnt/e.img state.json >v2.txt 2>&1 || fail "after remount: $(tail -n1 v2.txt)"
"$ASIFFS" umount mnt
umount src || fail "unmounting the tmpfs"
echo "PASS check clean; after remount $(cat v2.txt)"
