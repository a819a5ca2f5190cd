#!/usr/bin/env bash
# Every image format through one directory mount. SOURCE holds the two real
# compressed vectors (hfsplus_zlib.dmg, hfsplus_bzip2.dmg), a UDRW .dmg and
# a .sparsebundle we create, disk.asif + disk.dmg sharing a stem, and two
# bad images (a truncated .dmg, a bundle with a garbage Info.plist).
# - the vectors read with their known whole-disk MD5 and refuse writes
#   (EROFS), and their copies in SOURCE stay byte-identical;
# - UDRW and bundle: fio random and unaligned writes verified, then again
#   after unmount + cold cache + remount; an 8 MiB punch frees host space
#   (bundle: its band file is removed) and SEEK_DATA / SEEK_HOLE report it,
#   also after another remount; ls -l shows the nominal size;
# - the shared stem shows disk.asif.img and disk.dmg.img, never disk.img;
# - the bad images are skipped with a reason (at mount on stderr, later in
#   the --log file); a bundle repaired in place is then served;
# - a second writable mount of SOURCE skips every image as locked.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
require_asiffs
command -v fio >/dev/null || fail "fio not installed (apt-get install fio)"

cd "$TESTDIR"
mkdir -p src mnt mnt2
MiB=$((1 << 20))
GiB=$((1 << 30))

cp "$VECTORS/udif/hfsplus_zlib.dmg" "$VECTORS/udif/hfsplus_bzip2.dmg" src/
vector_md5="$(md5sum src/hfsplus_*.dmg)"
"$ASIFFS" create src/rw.dmg --size 1G >/dev/null
"$ASIFFS" create src/bundle.sparsebundle --size 1G --band-size 8M >/dev/null
"$ASIFFS" create src/disk.asif --size 64M >/dev/null
"$ASIFFS" create src/disk.dmg --size 32M >/dev/null
# bad_images DIR SUFFIX: a truncated .dmg and a bundle whose Info.plist is
# not a property list, built in a staging directory and moved into DIR.
bad_images() {
    mkdir -p stage
    head -c $(($(stat -c %s src/hfsplus_zlib.dmg) / 2)) src/hfsplus_zlib.dmg >"stage/trunc$2.dmg"
    "$ASIFFS" create "stage/badinfo$2.sparsebundle" --size 1G --band-size 8M >/dev/null
    echo "this is not a property list" >"stage/badinfo$2.sparsebundle/Info.plist"
    mv "stage/trunc$2.dmg" "stage/badinfo$2.sparsebundle" "$1/"
}
# assert_skipped FILE SUFFIX: FILE names both bad images as skipped, with a reason.
assert_skipped() {
    grep -E "trunc$2\.dmg: skipped: .+no koly trailer in the last 512 bytes" "$1" >/dev/null || fail "truncated .dmg not skipped with a reason in $1: $(cat "$1")"
    grep -E "badinfo$2\.sparsebundle: skipped: .+Info\.plist.+" "$1" >/dev/null \
        || fail "bundle with a bad Info.plist not skipped with a reason in $1: $(cat "$1")"
    grep -E "(trunc|badinfo)$2\.[a-z]+: skipped" "$1" | sed 's/^/    /'
}
bad_images src ""

mount_src() {
    "$ASIFFS" mount src mnt --log "$TESTDIR/$1" 2>"$TESTDIR/$1.err"
    mountpoint -q mnt || fail "mount ($1) did not appear"
}

# --- listing: shown names, collisions, bad images skipped with a reason -------
mount_src mount1.log
want="bundle.img
disk.asif.img
disk.dmg.img
hfsplus_bzip2.img
hfsplus_zlib.img
rw.img"
assert_eq "$want" "$(ls mnt | LC_ALL=C sort)" "listing of the mount"
[[ ! -e mnt/disk.img ]] || fail "disk.img exists although disk.asif and disk.dmg share the stem"
assert_eq $((64 * MiB)) "$(stat -c %s mnt/disk.asif.img)" "size of disk.asif.img"
assert_eq $((32 * MiB)) "$(stat -c %s mnt/disk.dmg.img)" "size of disk.dmg.img"
echo "PASS listing: NAME.img per image, disk.asif.img + disk.dmg.img; bad images skipped at mount (stderr of mount):"
assert_skipped mount1.log.err ""
# Once detached, the server logs to --log: bad images added now are named there.
bad_images src 2
assert_eq "$want" "$(ls mnt | LC_ALL=C sort)" "listing after adding two more bad images"
[[ ! -e mnt/trunc2.img && ! -e mnt/badinfo2.img ]] || fail "a bad image added later is shown"
echo "PASS bad images added while mounted are skipped, logged in --log:"
assert_skipped mount1.log 2
# Repaired in place (the bundle directory itself unchanged), it is served.
cat src/bundle.sparsebundle/Info.plist >src/badinfo2.sparsebundle/Info.plist
assert_eq $((GiB)) "$(stat -c %s mnt/badinfo2.img)" "size of badinfo2.img once its Info.plist is repaired"
rm -rf src/badinfo2.sparsebundle
[[ ! -e mnt/badinfo2.img ]] || fail "badinfo2.img still shown after its bundle was removed"
# A bundle directory's search bits do not show; chmod keeps it searchable.
assert_eq "-rw-r--r--" "$(stat -c %A mnt/bundle.img)" "mode of bundle.img"
chmod 640 mnt/bundle.img
assert_eq "-rw-r-----" "$(stat -c %A mnt/bundle.img)" "mode of bundle.img after chmod 640"
assert_eq "drwxr-x---" "$(stat -c %A src/bundle.sparsebundle)" "mode of the bundle directory after chmod 640"
chmod 644 mnt/bundle.img
echo "PASS a bundle repaired in place is served; bundle.img mode -rw-r--r--, chmod keeps the directory searchable"

# --- the real compressed vectors: content, read-only ------------------------
assert_eq 399bfcc39637bde7e43eb86fcc8565ae "$(md5sum <mnt/hfsplus_zlib.img | cut -d' ' -f1)" "MD5 of hfsplus_zlib.img"
assert_eq 7ec785450bbc17de417be373fd5d2159 "$(md5sum <mnt/hfsplus_bzip2.img | cut -d' ' -f1)" "MD5 of hfsplus_bzip2.img"
for v in hfsplus_zlib hfsplus_bzip2; do
    got="$(python3 - "mnt/$v.img" <<'PY'
import sys
try:
    open(sys.argv[1], "r+b")
    print("opened")
except OSError as e:
    print(e.errno)
PY
)"
    assert_eq 30 "$got" "errno opening $v.img for write"
    assert_cmd_fails dd if=/dev/zero of="mnt/$v.img" bs=512 count=1 conv=notrunc status=none
    grep -q "Read-only file system" "$TESTDIR/.last_out" || fail "dd on $v.img: $(cat "$TESTDIR/.last_out")"
    grep -q "$v.dmg: serving read-only: compressed UDIF" mount1.log.err || fail "no read-only note for $v.dmg from the mount"
done
echo "PASS vectors read with the known MD5; open for write fails with EROFS (errno 30)"

# --- UDRW .dmg and .sparsebundle: fio write + verify -------------------------
# jobfile OUT IMAGE SEQRW RANDRW VERIFY: each job on its own region below
# 256 MiB; randrepeat makes the read pass visit exactly the written blocks.
jobfile() {
    cat >"$1" <<JOB
[global]
filename=mnt/$2
ioengine=libaio
size=64M
randrepeat=1
verify=crc32c
verify_fatal=1
verify_state_save=0
do_verify=$5
[rand-direct]
direct=1
rw=$4
bs=4k
iodepth=16
io_size=8M
offset=0
[seq-direct]
direct=1
rw=$3
bs=1M
iodepth=4
offset=64M
[rand-buffered]
direct=0
rw=$4
bs=4k
io_size=4M
offset=128M
[unaligned-buffered]
direct=0
rw=$3
bs=3584
size=8M
offset=192M
JOB
}
run_fio() {
    local rc=0
    timeout 300 fio --output="$2" "$1" >/dev/null 2>"$2.err" || rc=$?
    if [[ $rc -ne 0 ]] || grep -q "err= *[1-9]" "$2"; then
        grep -h -m3 -iE "verify|bad|error|err=" "$2.err" "$2" >&2 || true
        fail "$3: fio exit $rc"
    fi
}
for img in rw bundle; do
    jobfile "write-$img.fio" "$img.img" write randwrite 1
    jobfile "read-$img.fio" "$img.img" read randread 0
    run_fio "write-$img.fio" "write-$img.log" "$img: write + verify"
    assert_eq "$GiB" "$(stat -c %s "mnt/$img.img")" "size of $img.img"
    assert_eq "$GiB" "$(ls -l "mnt/$img.img" | awk '{print $5}')" "ls -l size of $img.img"
done
"$ASIFFS" umount mnt
sync
echo 3 >/proc/sys/vm/drop_caches
mount_src mount2.log
for img in rw bundle; do
    run_fio "read-$img.fio" "reread-$img.log" "$img: verify after remount"
done
echo "PASS UDRW .dmg and .sparsebundle: random, sequential and unaligned writes verified, again after remount"

# --- punch: host space freed, holes reported --------------------------------
# seeks IMAGE: "SEEK_DATA(600M) SEEK_HOLE(704M) SEEK_HOLE(300M)", ENXIO as -6.
seeks() {
    python3 - "$1" <<'PY'
import os, sys
M = 1 << 20
fd = os.open(sys.argv[1], os.O_RDONLY)
out = []
for off, whence in ((600 * M, os.SEEK_DATA), (704 * M, os.SEEK_HOLE), (300 * M, os.SEEK_HOLE)):
    try:
        out.append(str(os.lseek(fd, off, whence) // M))
    except OSError as e:
        out.append(str(-e.errno))
print(" ".join(out))
PY
}
usage_kib() { du -sk "$1" | cut -f1; }
band=src/bundle.sparsebundle/bands/58 # 704 MiB / 8 MiB = 0x58
for img in rw bundle; do
    container=src/rw.dmg
    [[ $img == bundle ]] && container=src/bundle.sparsebundle
    dd if=/dev/urandom of=pattern bs=1M count=8 status=none
    dd if=pattern of="mnt/$img.img" bs=1M seek=704 conv=notrunc,fsync status=none
    assert_eq "704 712 300" "$(seeks "mnt/$img.img")" "$img: SEEK_DATA/SEEK_HOLE around the 8 MiB written at 704 MiB"
    [[ $img == bundle ]] && { [[ -f $band ]] || fail "band 58 not created by the write at 704 MiB"; }
    before=$(usage_kib "$container")
    fallocate -p -o $((704 * MiB)) -l $((8 * MiB)) "mnt/$img.img"
    sync
    after=$(usage_kib "$container")
    [[ $((before - after)) -ge 8000 ]] || fail "$img: punching 8 MiB freed only $((before - after)) KiB ($before -> $after)"
    [[ $img == bundle ]] && { [[ ! -e $band ]] || fail "band 58 still present after a whole-band punch"; }
    assert_eq "-6 704 300" "$(seeks "mnt/$img.img")" "$img: SEEK_DATA/SEEK_HOLE after the punch"
    # A pipeline, not <(...): a reader left behind by cmp would keep the
    # mount busy for the umount below.
    dd if="mnt/$img.img" bs=1M skip=704 count=8 status=none | cmp -n $((8 * MiB)) - /dev/zero \
        || fail "$img: punched range does not read as zeros"
    echo "PASS $img: punch freed $((before - after)) KiB on the host; SEEK_DATA/SEEK_HOLE report the holes"
done
"$ASIFFS" umount mnt
mount_src mount3.log
for img in rw bundle; do
    assert_eq "-6 704 300" "$(seeks "mnt/$img.img")" "$img: SEEK_DATA/SEEK_HOLE after remount"
    run_fio "read-$img.fio" "reread2-$img.log" "$img: verify after punch and remount"
    assert_eq "$GiB" "$(ls -l "mnt/$img.img" | awk '{print $5}')" "ls -l size of $img.img after remount"
done
[[ ! -e $band ]] || fail "band 58 came back after remount"
echo "PASS after another remount: holes still reported, fio data still verifies"

# --- a second writable mount of the same SOURCE ------------------------------
# It still mounts (SOURCE may gain images later), showing none of these.
"$ASIFFS" mount src mnt2 --log "$TESTDIR/second.log" 2>second.err || fail "second mount: $(cat second.err)"
mountpoint -q mnt2 || fail "second mount did not appear"
for c in hfsplus_zlib.dmg hfsplus_bzip2.dmg rw.dmg bundle.sparsebundle disk.asif disk.dmg; do
    grep -qE "$c: skipped: locked by another process" second.err \
        || fail "second mount: $c not skipped as locked: $(cat second.err)"
done
assert_eq "" "$(ls mnt2)" "listing of the second mount (every image locked)"
"$ASIFFS" umount mnt2
assert_eq "$want" "$(ls mnt | LC_ALL=C sort)" "listing of the first mount after the second tried"
echo "PASS second writable mount: every image skipped as locked"

"$ASIFFS" umount mnt
assert_eq "$vector_md5" "$(md5sum src/hfsplus_*.dmg)" "the vector copies in SOURCE changed"
echo "PASS vector copies unchanged"
