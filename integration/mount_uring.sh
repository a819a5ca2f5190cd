#!/usr/bin/env bash
# FUSE over io_uring (-o uring=): asiffs' own transport carries the kernel's
# requests over per-CPU ring queues instead of read/write on /dev/fuse. The
# ring changes how every request arrives, is answered and is torn down, so
# the paths that differ are checked with exact bytes and exit codes:
#   1. uring=on serves an ASIF and a raw UDRW image over the ring (stats say
#      "transport": "uring"), uring=off over /dev/fuse ("classic");
#   2. fio verify at queue depth 32 with a one-group index cache (evictions
#      while 32 requests are in flight), the bytes unchanged across a remount
#      with the classic transport;
#   3. unmounting with 32 requests in flight: a busy umount is refused and
#      changes nothing, a lazy one keeps serving until the last close, a
#      forced one aborts the ring; each time the server exits, image clean;
#   4. SIGKILL of the server under load: ENOTCONN, remount of the same
#      directory, image clean, fsynced data intact;
#   5. requests interrupted by signals (SIGINT kills, SIGUSR1 to dd, SIGALRM
#      every 0.2 ms): exact bytes, no request left waiting in the kernel;
#   6. uring=on when the kernel has it turned off: one exact line, no mount.
# Needs root and a kernel with CONFIG_FUSE_IO_URING; sets enable_uring to 1
# (0 for a moment in case 6) and restores the old value on exit.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
require_asiffs
command -v fio >/dev/null || fail "fio not installed (apt-get install fio)"
[[ $EUID -eq 0 ]] || fail "needs root (FUSE over io_uring mounts without fusermount3)"

KNOB=/sys/module/fuse/parameters/enable_uring
[[ -e $KNOB ]] || fail "$KNOB missing: the kernel has no FUSE over io_uring (6.14+, CONFIG_FUSE_IO_URING)"
OLD_KNOB="$(cat "$KNOB")"
BG_PIDS=()
# On exit: stop background load (it would keep a mount busy), put the knob
# back, then lib.sh's cleanup (unmounts, removes $TESTDIR) with our status.
_uring_cleanup() {
    local rc=$? p
    set +e
    for p in "${BG_PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
    for p in "${BG_PIDS[@]}"; do wait "$p" 2>/dev/null; done
    echo "$OLD_KNOB" >"$KNOB" 2>/dev/null || log "warning: could not restore $KNOB to $OLD_KNOB"
    (exit "$rc")
    _lib_cleanup
}
trap _uring_cleanup EXIT
echo 1 >"$KNOB"

MIB=$((1 << 20))
start_all=$SECONDS
cd "$TESTDIR"
mkdir -p src mnt fusectl
# The fuse control filesystem: /N/waiting counts connection N's requests
# the kernel waits on, which shows load in flight and, later, none stuck.
if [[ -d /sys/fs/fuse/connections ]] && mountpoint -q /sys/fs/fuse/connections; then
    FUSECTL=/sys/fs/fuse/connections
else
    mount -t fusectl fusectl fusectl || fail "cannot mount the fuse control filesystem"
    FUSECTL="$TESTDIR/fusectl"
fi

"$ASIFFS" create --size 256M src/x.asif >/dev/null
"$ASIFFS" create --size 64M src/y.dmg >/dev/null
"$ASIFFS" create --size 10G src/w.asif >/dev/null
head -c $((32 * MIB)) /dev/urandom >pat

# x.img (256 MiB) is laid out so each case owns its bytes:
#   0-128M   fio   128-160M  SIGALRM writer   192-224M  fsynced before SIGKILL
#   224-256M dd under SIGINT / SIGUSR1
# w.img (10 GiB) has five chunk-groups (2 GiB each): fio works in the first
# four, so that a one-group index cache evicts and reloads while it has 32
# requests in flight; the fifth holds one block, written in case 1, read to
# evict the others.

# wait_dead PID SECONDS WHAT: poll until PID has exited; fail after SECONDS.
wait_dead() {
    local i
    for ((i = 0; i < $2 * 20; i++)); do
        alive "$1" || return 0
        sleep 0.05
    done
    fail "$3: process $1 still running after $2 s"
}

# reap PID: wait for the background PID, its exit code in REAP_RC; it is
# no longer ours to kill at exit.
reap() {
    REAP_RC=0
    wait "$1" || REAP_RC=$?
    BG_PIDS=()
}

# in_mountinfo DIR: DIR is a mount point (from mountinfo, no stat: works on
# a mount whose server is gone).
in_mountinfo() {
    mounts_below "$1" | grep -qx "$(realpath -m "$1")"
}

# stat_of MOUNTPOINT NAME FIELD: one field of an image's user.asiffs.stats.
stat_of() {
    "$ASIFFS" stats "$1" "$2" | python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$3"
}

# assert_transport MOUNTPOINT TRANSPORT IO NAME...: each image's stats name
# TRANSPORT ("uring" or "classic") and IO ("io_uring" or "blocking").
assert_transport() {
    local mp="$1" transport="$2" io="$3" n
    shift 3
    for n in "$@"; do
        assert_eq "$transport" "$(stat_of "$mp" "$n" transport)" "transport of $n"
        assert_eq "$io" "$(stat_of "$mp" "$n" io)" "io of $n"
    done
}

# queue_threads PID: how many ring queue threads (asiffs-qN) the server runs.
queue_threads() {
    cat /proc/"$1"/task/*/comm 2>/dev/null | grep -cE '^asiffs-q[0-9]+$' || true
}

# conn_of MOUNTPOINT: the mount's FUSE connection number (its device minor,
# from mountinfo: no stat of the mount).
conn_of() {
    local dir minor
    dir="$(realpath -m "$1")"
    minor="$(awk -v d="$dir" '$5 == d { split($3, a, ":"); m = a[2] } END { print m }' /proc/self/mountinfo)"
    [[ -n "$minor" ]] || fail "$1 is not in mountinfo"
    echo "$minor"
}

# conn_waiting MOUNTPOINT: requests the kernel waits on for this mount.
conn_waiting() {
    cat "$FUSECTL/$(conn_of "$1")/waiting"
}

# assert_conn_gone CONN WHAT: poll (5 s at most) until the kernel has
# dropped connection CONN, i.e. no superblock is left behind. (The number
# may already serve someone else's new mount: then it is in mountinfo.)
assert_conn_gone() {
    local i
    for ((i = 0; i < 100; i++)); do
        [[ -d $FUSECTL/$1 ]] || return 0
        awk -v c="0:$1" '$3 == c { f = 1 } END { exit !f }' /proc/self/mountinfo && return 0
        sleep 0.05
    done
    fail "$2: FUSE connection $1 still exists 5 s later ($(cat "$FUSECTL/$1/waiting") requests waiting)"
}

# wait_in_flight: poll (10 s at most) until the load started by start_load
# has done 1000 writes to x.img (so it has the file open, for its 30 s) and
# the connection has requests in flight. (Requests alone are not enough:
# fio's setup looks the file up and opens and closes it before the load.)
wait_in_flight() {
    local i
    for ((i = 0; i < 200; i++)); do
        alive "$LOAD_PID" || fail "the load exited before it got going: $(tail -n2 "$LOAD_LOG.err")"
        if [[ $(($(stat_of mnt x writes) - LOAD_W0)) -ge 1000 && $(conn_waiting mnt) -gt 0 ]]; then
            return 0
        fi
        sleep 0.05
    done
    fail "the load did not get 1000 writes in flight on mnt within 10 s ($(conn_waiting mnt) waiting)"
}

# wait_idle MOUNTPOINT: poll (5 s at most) until no request waits.
wait_idle() {
    local i
    for ((i = 0; i < 100; i++)); do
        [[ $(conn_waiting "$1") -eq 0 ]] && return 0
        sleep 0.05
    done
    fail "$(conn_waiting "$1") requests still waiting on $1 5 s after the load ended"
}

# errno_of DIR: the errno name a listing of DIR fails with ("ok" if it
# works). Not stat: cached attributes answer that without the server.
errno_of() {
    python3 -c '
import errno, os, sys
try:
    os.listdir(sys.argv[1]); print("ok")
except OSError as e:
    print(errno.errorcode[e.errno])' "$1"
}

# run_fio LOG WHAT ARGS...: fio must exit 0 and report no error.
run_fio() {
    local logf="$1" what="$2" rc=0
    shift 2
    timeout 60 fio --output="$logf" "$@" >/dev/null 2>"$logf.err" || rc=$?
    [[ $rc -ne 124 ]] || fail "$what: fio did not finish within 60 s"
    if [[ $rc -ne 0 ]] || grep -q "err= *[1-9]" "$logf"; then
        grep -h -m3 -iE "verify|bad|error|err=" "$logf.err" "$logf" >&2 || true
        fail "$what: fio exit $rc ($(grep -h -iE 'verify|bad|error' "$logf.err" "$logf" | head -n1; tail -n1 "$logf.err"))"
    fi
}

# start_load LOG: QD32 direct 4 KiB random reads and writes on mnt/x.img's
# first 128 MiB for 30 s, in the background; sets LOAD_PID.
start_load() {
    LOAD_LOG="$1"
    LOAD_W0="$(stat_of mnt x writes)"
    fio --name=load --filename=mnt/x.img --rw=randrw --bs=4k --iodepth=32 \
        --ioengine=libaio --direct=1 --size=128M --time_based --runtime=30 \
        --output="$1" >/dev/null 2>"$1.err" &
    LOAD_PID=$!
    BG_PIDS+=("$LOAD_PID")
}

# region FILE OFFSET_MIB: the 32 MiB of FILE at OFFSET_MIB, read with
# O_DIRECT (from the server, not the page cache).
region() {
    dd if="$1" bs=1M skip="$2" count=32 iflag=direct status=none
}

# assert_region FILE OFFSET_MIB WHAT: that region holds exactly pat.
assert_region() {
    cmp pat <(region "$1" "$2") || fail "$3: $1 at ${2}M differs from the pattern"
}

# --- 1. uring=on serves both formats over the ring; uring=off classic ----------
t=$SECONDS
"$ASIFFS" mount -o uring=on src mnt
pid="$(server_pid mnt)"
conn="$(conn_of mnt)"
assert_eq "w.img x.img y.img" "$(ls mnt | paste -sd' ')" "listing of the uring=on mount"
assert_transport mnt uring io_uring x y w
assert_eq asif "$(stat_of mnt x format)" "format of x.img"
assert_eq udrw "$(stat_of mnt y format)" "format of y.img"
[[ $(queue_threads "$pid") -ge 1 ]] || fail "uring=on server $pid runs no ring queue thread (asiffs-qN)"
# The raw .dmg is the disk itself: what goes in through the ring is in the file.
dd if=pat of=mnt/y.img bs=1M seek=16 oflag=direct conv=notrunc,fsync status=none
assert_region mnt/y.img 16 "y.img through the ring"
head -c 4096 pat | dd of=mnt/w.img bs=4k seek=$((9 << 18)) oflag=direct conv=notrunc,fsync status=none
"$ASIFFS" umount mnt
alive "$pid" && fail "server $pid still running after asiffs umount"
assert_conn_gone "$conn" "asiffs umount of a uring=on mount"
cmp pat <(dd if=src/y.dmg bs=1M skip=16 count=32 status=none) || fail "y.dmg at 16M does not hold what was written through the ring"
assert_exit 0 "$ASIFFS" check src/y.dmg

"$ASIFFS" mount -o uring=off src mnt
pid="$(server_pid mnt)"
assert_transport mnt classic io_uring x y
assert_eq 0 "$(queue_threads "$pid")" "ring queue threads of the uring=off server"
assert_region mnt/y.img 16 "y.img through /dev/fuse"
"$ASIFFS" umount mnt
echo "PASS uring=on: transport uring for asif and udrw, bytes in the .dmg; uring=off: classic ($((SECONDS - t))s)"

# --- 2. fio verify at QD32 over the ring, one-group cache; same bytes classic ----
t=$SECONDS
"$ASIFFS" mount -o uring=on --cache-tables 1 src mnt
assert_transport mnt uring io_uring x w
FIO_COMMON=(--bs=4k --iodepth=32 --ioengine=libaio --direct=1 --verify=crc32c
    --do_verify=1 --verify_fatal=1 --verify_state_save=0)
run_fio f-write.log "randwrite verify on x.img" --name=v --filename=mnt/x.img \
    --rw=randwrite --size=128M "${FIO_COMMON[@]}"
run_fio f-mixed.log "randrw verify on x.img" --name=m --filename=mnt/x.img \
    --rw=randrw --size=128M "${FIO_COMMON[@]}"
# Four jobs, one per chunk-group of w.img, 32 MiB each: written and
# verified while the groups are dirty (and so pinned); then, once an fsync
# made them clean and a read of a fifth group evicted them, read back and
# verified again (randread visits every block once, and each carries its
# offset and crc32c) while 4 x 32 requests keep evicting each other's group.
GROUP_JOBS=(--filename=mnt/w.img --size=32M --numjobs=4 --offset_increment=2G)
run_fio f-groups.log "randwrite verify across 4 chunk-groups of w.img" --name=g \
    --rw=randwrite "${GROUP_JOBS[@]}" "${FIO_COMMON[@]}"
sync mnt/w.img
cmp <(head -c 4096 pat) <(dd if=mnt/w.img bs=4k count=1 skip=$((9 << 18)) iflag=direct status=none) ||
    fail "w.img's block at 9G (the fifth group) differs from what case 1 wrote"
misses0="$(stat_of mnt w cache_misses)"
run_fio f-groups-read.log "randread verify across 4 evicted chunk-groups of w.img" --name=g \
    --rw=randread "${GROUP_JOBS[@]}" "${FIO_COMMON[@]}"
misses=$(($(stat_of mnt w cache_misses) - misses0))
[[ $misses -ge 4 ]] || fail "w.img: $misses cache misses reading back 4 evicted groups through a 1-group cache"
assert_transport mnt uring io_uring x w
sums() {
    sha256sum <mnt/x.img | cut -d' ' -f1
    for g in 0 2048 4096 6144; do region mnt/w.img $g | sha256sum | cut -d' ' -f1; done
}
before="$(sums)"
"$ASIFFS" umount mnt
assert_check_clean src/x.asif "x.asif after fio over the ring"
assert_check_clean src/w.asif "w.asif after fio over the ring"
"$ASIFFS" mount -o uring=off src mnt
assert_transport mnt classic io_uring x w
assert_eq "$before" "$(sums)" "sha256 of x.img and w.img's regions, uring=on vs remounted uring=off"
"$ASIFFS" umount mnt
echo "PASS fio verify QD32 over the ring (128M randwrite, randrw; 4 chunk-groups, read back with $misses group loads), bytes unchanged under uring=off ($((SECONDS - t))s)"

# --- 3. unmount with 32 requests in flight: busy, lazy, forced ------------------
t=$SECONDS
"$ASIFFS" mount -o uring=on src mnt
pid="$(server_pid mnt)"
conn="$(conn_of mnt)"
start_load lazy.log
wait_in_flight
rc=0
"$ASIFFS" umount mnt >umount.out 2>umount.err || rc=$?
assert_eq 1 "$rc" "exit code of asiffs umount of a busy mount"
assert_eq "asiffs: unmounting $TESTDIR/mnt (busy: try --lazy): Device or resource busy (os error 16)" \
    "$(cat umount.out umount.err)" "asiffs umount of a busy mount"
mountpoint -q mnt || fail "a refused umount left mnt unmounted"
assert_eq uring "$(stat_of mnt x transport)" "transport after a refused umount"
assert_exit 0 "$ASIFFS" umount -l mnt
mountpoint -q mnt && fail "asiffs umount -l left mnt mounted"
alive "$pid" || fail "server $pid exited with a file still open on the lazily unmounted mount"
alive "$LOAD_PID" || fail "fio stopped when the mount was detached: $(head -n3 lazy.log.err)"
kill -INT "$LOAD_PID"
wait_dead "$LOAD_PID" 10 "fio after SIGINT on a lazily unmounted mount"
reap "$LOAD_PID"
grep -q "err= 0" lazy.log || fail "I/O failed on the lazily unmounted mount: $(grep -m1 -E 'err=|error' lazy.log lazy.log.err)"
wait_dead "$pid" 10 "server after the last file on its lazily unmounted mount closed"
assert_conn_gone "$conn" "lazy unmount under load"
assert_check_clean src/x.asif "x.asif after a lazy unmount under load"

"$ASIFFS" mount -o uring=on src mnt
pid="$(server_pid mnt)"
conn="$(conn_of mnt)"
start_load forced.log
wait_in_flight
rc=0
umount -f mnt 2>forced.err || rc=$?
assert_eq 32 "$rc" "exit code of umount -f with fio's file open (aborts, then busy)"
wait_dead "$LOAD_PID" 10 "fio after umount -f aborted its requests"
reap "$LOAD_PID"
assert_ne 0 "$REAP_RC" "exit code of fio whose requests umount -f aborted"
grep -qE "err=(107|103)" forced.log || fail "fio after umount -f: $(grep -m1 -E 'err=' forced.log)"
wait_dead "$pid" 10 "server after umount -f"
assert_eq ENOTCONN "$(errno_of mnt)" "listing of an aborted mount"
umount mnt
in_mountinfo mnt && fail "the aborted mount would not unmount"
assert_conn_gone "$conn" "umount -f under load, then umount"
assert_check_clean src/x.asif "x.asif after umount -f under load"
echo "PASS unmount with QD32 in flight: busy refused exactly, lazy serves to the last close, forced aborts; server exits, check clean ($((SECONDS - t))s)"

# --- 4. SIGKILL under load: ENOTCONN, remount, check clean, fsynced data kept ---
t=$SECONDS
"$ASIFFS" mount -o uring=on src mnt
pid="$(server_pid mnt)"
conn="$(conn_of mnt)"
dd if=pat of=mnt/x.img bs=1M seek=192 conv=notrunc,fsync status=none
start_load kill.log
wait_in_flight
kill -KILL "$pid"
wait_dead "$pid" 10 "server after SIGKILL"
wait_dead "$LOAD_PID" 10 "fio after its server was killed"
reap "$LOAD_PID"
assert_ne 0 "$REAP_RC" "exit code of fio whose server was killed"
assert_eq ENOTCONN "$(errno_of mnt)" "listing of the mount of a killed server"
in_mountinfo mnt || fail "the dead mount vanished by itself"
rc=0
"$ASIFFS" umount mnt >umount.out 2>umount.err || rc=$?
assert_eq 0 "$rc" "exit code of asiffs umount of a dead mount"
[[ "$(cat umount.err)" == *" $TESTDIR/mnt: no asiffs server answers here; unmounting anyway" ]] ||
    fail "asiffs umount of a dead mount said: $(cat umount.err)"
in_mountinfo mnt && fail "asiffs umount left the dead mount"
assert_conn_gone "$conn" "SIGKILL under load, then asiffs umount"
assert_check_clean src/x.asif "x.asif after SIGKILL of a uring server under load"
"$ASIFFS" mount -o uring=on src mnt
assert_eq uring "$(stat_of mnt x transport)" "transport of the remount after SIGKILL"
assert_region mnt/x.img 192 "data fsynced before the SIGKILL"
echo "PASS SIGKILL under QD32: ENOTCONN, server gone, remount, check clean, fsynced 32 MiB intact ($((SECONDS - t))s)"

# --- 5. requests interrupted by signals ---------------------------------------
t=$SECONDS
pid="$(server_pid mnt)"
# SIGINT ends dd mid-run: buffered 4 KiB writes (one synchronous FUSE write
# each, which a signal interrupts) and direct reads. 124: timeout's SIGINT
# ended it; 137 would be a dd stuck in a request 10 s after it.
ints=0
for i in 1 2 3 4 5 6; do
    delay="0.$((RANDOM % 4 + 1))"
    for cmd in "dd if=pat of=mnt/x.img bs=4k seek=$((224 * 256)) conv=notrunc status=none" \
        "dd if=mnt/x.img of=/dev/null bs=4k iflag=direct status=none"; do
        rc=0
        # shellcheck disable=SC2086
        timeout -k 10 -s INT "$delay" $cmd || rc=$?
        [[ $rc -eq 0 || $rc -eq 124 ]] || fail "'$cmd' under SIGINT after ${delay}s: exit $rc"
        [[ $rc -eq 124 ]] && ints=$((ints + 1))
    done
done
[[ $ints -ge 6 ]] || fail "only $ints of 12 dd runs were still running when SIGINT came"
# SIGUSR1 makes dd print its counts and carry on: its write() calls are
# interrupted over and over, and must still put every byte in place.
dd if=pat of=mnt/x.img bs=4k seek=$((224 * 256)) conv=notrunc,fsync 2>usr1.err &
ddpid=$!
BG_PIDS+=("$ddpid")
# Until dd catches SIGUSR1 (signal 10: bit 9 of SigCgt), the signal kills it.
for ((i = 0; i < 400; i++)); do
    cgt="$(awk '/^SigCgt:/ { print $2 }' "/proc/$ddpid/status" 2>/dev/null)" || cgt=""
    [[ -n $cgt ]] && (((16#$cgt >> 9) & 1)) && break
    alive "$ddpid" || break
    sleep 0.005
done
for ((i = 0; i < 2000; i++)); do
    alive "$ddpid" || break
    kill -USR1 "$ddpid" 2>/dev/null || break
    sleep 0.005
done
wait_dead "$ddpid" 10 "dd under SIGUSR1"
reap "$ddpid"
assert_eq 0 "$REAP_RC" "exit code of dd under SIGUSR1"
usr1=$(($(grep -c 'records in' usr1.err || true) - 1))   # less the final report
[[ $usr1 -ge 5 ]] || fail "dd reported only $usr1 SIGUSR1s: the signals missed it"
assert_region mnt/x.img 224 "dd's writes under SIGUSR1"
# SIGALRM every 0.2 ms, with a handler: writes, fsync and uncached reads of
# 32 MiB in 64 KiB calls, three times; short calls are continued.
cat >sigalrm.py <<'PY'
import os, signal, sys
path, pat, off, passes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
want = open(pat, "rb").read()
hits = 0
def on_alarm(signum, frame):
    global hits
    hits += 1
signal.signal(signal.SIGALRM, on_alarm)
signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
CH = 64 << 10
fd = os.open(path, os.O_RDWR)
bad = 0
for p in range(passes):
    for i in range(0, len(want), CH):
        done = 0
        while done < CH:
            done += os.pwrite(fd, memoryview(want)[i + done:i + CH], off + i + done)
    os.fsync(fd)
    os.posix_fadvise(fd, off, len(want), os.POSIX_FADV_DONTNEED)
    for i in range(0, len(want), CH):
        got = b""
        while len(got) < CH:
            b = os.pread(fd, CH - len(got), off + i + len(got))
            if not b:
                break
            got += b
        if got != want[i:i + CH]:
            bad += 1
signal.setitimer(signal.ITIMER_REAL, 0, 0)
print(f"{hits} signals, {bad} bad 64 KiB chunks")
sys.exit(1 if bad or hits < 100 else 0)
PY
timeout -k 5 60 python3 sigalrm.py mnt/x.img pat $((128 * MIB)) 3 >sigalrm.out ||
    fail "SIGALRM writer/reader: $(cat sigalrm.out)"
# Afterwards: nothing waits, every region reads back exactly, stats answer.
wait_idle mnt
assert_region mnt/x.img 128 "SIGALRM writer's region"
assert_region mnt/x.img 192 "fsynced region (untouched by the signal runs)"
assert_region mnt/x.img 224 "dd's region"
assert_eq uring "$(stat_of mnt x transport)" "transport after the signal runs"
alive "$pid" || fail "server $pid died during the signal runs"
conn="$(conn_of mnt)"
"$ASIFFS" umount mnt
assert_conn_gone "$conn" "asiffs umount after the signal runs"
assert_check_clean src/x.asif "x.asif after the signal runs"
echo "PASS signals: $ints dd runs ended by SIGINT, $usr1 SIGUSR1s, $(cut -d' ' -f1 sigalrm.out) SIGALRMs; bytes exact, no request waiting ($((SECONDS - t))s)"

# --- 6. uring=on with FUSE over io_uring turned off ---------------------------
t=$SECONDS
echo 0 >"$KNOB"
rc=0
"$ASIFFS" mount -o uring=on src mnt >on.out 2>on.err || rc=$?
"$ASIFFS" mount -o uring=auto src mnt 2>auto.err || { echo 1 >"$KNOB"; fail "uring=auto with the knob off: $(cat auto.err)"; }
echo 1 >"$KNOB"
assert_eq 1 "$rc" "exit code of uring=on with enable_uring off"
assert_eq "" "$(cat on.out)" "stdout of uring=on with enable_uring off"
assert_eq "asiffs: -o uring=on: FUSE over io_uring unavailable: the kernel has FUSE over io_uring turned off (echo 1 > /sys/module/fuse/parameters/enable_uring)" \
    "$(cat on.err)" "uring=on with enable_uring off"
assert_eq classic "$(stat_of mnt x transport)" "uring=auto with enable_uring off"
"$ASIFFS" umount mnt
assert_eq "" "$(mounts_below "$TESTDIR" | grep -vx "$(realpath "$TESTDIR")/fusectl" || true)" "mounts left below the test directory"
"$ASIFFS" mount -o uring=auto src mnt
assert_eq uring "$(stat_of mnt x transport)" "uring=auto with enable_uring on"
"$ASIFFS" umount mnt
echo "PASS uring=on refused in one exact line with the kernel's ring off, nothing mounted; auto falls back to classic ($((SECONDS - t))s)"

echo "PASS all FUSE over io_uring cases ($((SECONDS - start_all))s)"
