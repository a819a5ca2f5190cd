#!/usr/bin/env bash
# asiffs mount: Apple's vectors and new images show as raw files with the
# right sizes, usage and content; images come and go with SOURCE; create,
# unlink, stats, read-only, locking, single-file mounts, umount and signals.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
require_asiffs

MIB=$((1 << 20))
BASIC_SHA=fc6505543ff7fe23cd82f71378a79217cecff7cf3d3d67130dd5aa9f78efacb6
cd "$TESTDIR"
mkdir -p src mnt mnt2

decompress_vectors src
"$ASIFFS" create src/new64.asif --size 64M
echo "not an image" >src/corrupt.asif

# expected_size NAME: virtual size of a vector or new image, from its name.
expected_size() {
    case "$1" in
    apple-basic) echo 512000000 ;;
    apple-blank-*GB) local n="${1#apple-blank-}"; echo $((${n%GB} * 1000000000)) ;;
    new64) echo $((64 * MIB)) ;;
    *) fail "no expected size for $1" ;;
    esac
}

# --- mount returns once ready ------------------------------------------------
"$ASIFFS" mount src mnt -o allow_other --log "$TESTDIR/mount.log" 2>mount.err
mountpoint -q mnt || fail "mount returned before the mount was ready"
grep -q "corrupt.asif" mount.err || fail "corrupt image was not reported: $(cat mount.err)"
echo "PASS mount returns ready, corrupt image reported"

# --- names, sizes, usage -----------------------------------------------------
want="$(cd src && ls *.asif | grep -v '^corrupt' | sed 's/\.asif$/.img/' | sort)"
got="$(ls mnt | sort)"
assert_eq "$want" "$got" "listing of the mount"
for f in src/*.asif; do
    name="$(basename "$f" .asif)"
    [[ $name == corrupt ]] && continue
    img="mnt/$name.img"
    assert_eq "$(expected_size "$name")" "$(stat -c %s "$img")" "size of $img"
    assert_eq "$(stat -c %b "$f")" "$(stat -c %b "$img")" "st_blocks of $img (container usage)"
    [[ $(stat -c %o "$img") -ge 4096 ]] || fail "st_blksize of $img is $(stat -c %o "$img")"
    assert_eq "$(du -k "$f" | cut -f1)" "$(du -k "$img" | cut -f1)" "du of $img"
    assert_eq "$(stat -c %a.%u.%g "$f")" "$(stat -c %a.%u.%g "$img")" "mode/owner of $img"
done
echo "PASS sizes, st_blocks, st_blksize, du, mode"

# --- content -----------------------------------------------------------------
assert_eq "$BASIC_SHA" "$(sha256sum <mnt/apple-basic.img | cut -d' ' -f1)" "apple-basic content"
for f in mnt/apple-blank-*.img mnt/new64.img; do
    assert_all_zero "$f" "$(stat -c %s "$f")"
    # read a chunk near the end as well: SEEK_DATA alone proves nothing
    python3 - "$f" <<'PY' || fail "tail of $f is not zero"
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
assert os.pread(fd, 1 << 20, size - (1 << 20)) == bytes(1 << 20)
assert os.pread(fd, 4096, size - 100) == bytes(100)   # short read at the end
assert os.pread(fd, 4096, size) == b""
PY
done
echo "PASS content of every image (apple-basic sha256, blanks all zero)"

# --- writes, new images appear, vanish; create and unlink through the mount ---
python3 - mnt/new64.img <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
for i, off in enumerate([0, 777, (1 << 20) - 3, 5 << 20, (64 << 20) - 512]):
    os.pwrite(fd, bytes([i + 1]) * 512, off)
os.fsync(fd)
PY
gzip -dc "$VECTORS/apple-blank-10GB.asif.gz" >src/late.asif
ls mnt | grep -qx late.img || fail "late.img did not appear"
assert_eq 10000000000 "$(stat -c %s mnt/late.img)" "size of late.img"
rm src/late.asif
ls mnt | grep -qx late.img && fail "late.img did not vanish"
[[ -e mnt/late.img ]] && fail "late.img still resolves"
echo "PASS images appear and vanish without remount"

truncate -s 64G mnt/made.img
[[ -f src/made.asif ]] || fail "truncate in the mount did not create src/made.asif"
assert_eq $((64 << 30)) "$(stat -c %s mnt/made.img)" "size of made.img"
printf 'hello asif' | dd of=mnt/made.img bs=1 seek=$((40 << 30)) conv=notrunc status=none
assert_eq "hello asif" "$(dd if=mnt/made.img bs=1 skip=$((40 << 30)) count=10 status=none)" "made.img data"
truncate -s 32G mnt/made.img
assert_eq $((32 << 30)) "$(stat -c %s mnt/made.img)" "shrunk size of made.img"
truncate -s 48G mnt/made.img
assert_all_zero mnt/made.img $((48 << 30))
mknod mnt/nod.img p 2>/dev/null && fail "mknod of a fifo should be refused"
touch mnt/touched.img
assert_eq 0 "$(stat -c %s mnt/touched.img)" "touch creates an empty image"
rm mnt/touched.img
[[ -e src/touched.asif ]] && fail "unlink did not remove src/touched.asif"
mv mnt/made.img mnt/renamed.img
[[ -f src/renamed.asif && ! -e src/made.asif ]] || fail "rename did not rename the container"
echo "PASS create (truncate, touch), resize, unlink, rename"

# --- stats -------------------------------------------------------------------
"$ASIFFS" stats mnt apple-basic | python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["bytes_read"] > 0, d' \
    || fail "stats of apple-basic"
"$ASIFFS" stats mnt | python3 -c 'import json,sys; d=json.load(sys.stdin); assert "new64.img" in d and d["new64.img"]["writes"] >= 5, d' \
    || fail "stats of the whole mount"
echo "PASS stats"

# --- locking: a second writer is refused clearly -------------------------------
touch single.img
rc=0
"$ASIFFS" mount src/new64.asif single.img 2>lock.err || rc=$?
[[ $rc -ne 0 ]] || fail "second writable mount of a mounted image succeeded"
grep -qi "lock" lock.err || fail "locked image not reported clearly: $(cat lock.err)"
mountpoint -q single.img && fail "single.img got mounted"
echo "PASS second writer refused: $(head -n1 lock.err)"

# --- umount flushes and waits for the server -----------------------------------
pid="$(server_pid mnt)"
"$ASIFFS" umount mnt
mountpoint -q mnt && fail "still mounted after asiffs umount"
alive "$pid" && fail "server $pid still running after asiffs umount"
for f in new64 renamed apple-basic; do
    assert_exit 0 "$ASIFFS" check "src/$f.asif"
done
echo "PASS umount (server gone, images check clean)"

# --- remount: writes persisted; read-only mounts ----------------------------------
"$ASIFFS" mount src mnt -o ro
"$ASIFFS" mount src mnt2 -o ro
python3 - mnt/new64.img mnt2/renamed.img <<'PY' || fail "data lost across remount"
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
for i, off in enumerate([0, 777, (1 << 20) - 3, 5 << 20, (64 << 20) - 512]):
    assert os.pread(fd, 512, off) == bytes([i + 1]) * 512, off
fd = os.open(sys.argv[2], os.O_RDONLY)
assert os.pread(fd, 10, 40 << 30) == b"\0" * 10   # beyond the 32G shrink: gone
PY
assert_cmd_fails dd if=/dev/zero of=mnt/new64.img bs=4k count=1 conv=notrunc status=none
grep -q "Read-only" "$TESTDIR/.last_out" || fail "write on ro mount: $(cat "$TESTDIR/.last_out")"
assert_cmd_fails truncate -s 1G mnt/new.img
echo "PASS remount keeps data; two read-only mounts at once; writes get EROFS"
"$ASIFFS" umount mnt
"$ASIFFS" umount mnt2

# --- single image on a regular-file mountpoint; SIGTERM ends it cleanly -----------
"$ASIFFS" mount src/apple-basic.asif single.img
assert_eq 512000000 "$(stat -c %s single.img)" "single-file mount size"
assert_eq "$BASIC_SHA" "$(sha256sum <single.img | cut -d' ' -f1)" "single-file mount content"
pid="$(server_pid single.img)"
kill -TERM "$pid"
for ((i = 0; i < 100; i++)); do alive "$pid" || break; sleep 0.1; done
alive "$pid" && fail "server ignored SIGTERM"
mountpoint -q single.img && fail "SIGTERM left the mount behind"
echo "PASS single-file mount on a regular file; SIGTERM unmounts"

# --- foreground mode and SIGINT; directory mountpoint for a single image ----------
"$ASIFFS" mount -f src/new64.asif mnt 2>fg.log &
fgpid=$!
wait_for_mount mnt 10 "$fgpid"
assert_eq "new64.img" "$(ls mnt)" "single image in a directory mountpoint"
dd if=/dev/urandom of=mnt/new64.img bs=64k count=4 seek=3 conv=notrunc status=none
kill -INT "$fgpid"
rc=0
wait "$fgpid" || rc=$?
assert_eq 0 "$rc" "foreground server exit status after SIGINT"
mountpoint -q mnt && fail "SIGINT left the mount behind"
assert_exit 0 "$ASIFFS" check src/new64.asif
echo "PASS foreground mount, SIGINT flushes and unmounts"

# --- fusermount3 -u and plain umount end the server too ---------------------------
for how in "fusermount3 -u" "umount"; do
    "$ASIFFS" mount src mnt
    pid="$(server_pid mnt)"
    $how mnt
    for ((i = 0; i < 100; i++)); do alive "$pid" || break; sleep 0.1; done
    alive "$pid" && fail "server still running after $how"
done
assert_exit 0 "$ASIFFS" check src/new64.asif
echo "PASS fusermount3 -u and umount end the server"
