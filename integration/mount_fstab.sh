#!/usr/bin/env bash
# mount(8) conventions: `mount -t fuse.asiffs SRC MNT -o OPTS` and an fstab
# line reach asiffs through mount.fuse3 as `asiffs SRC MNT -o OPTS`, which
# mounts (and returns once ready) like `asiffs mount`; fstab-only options
# are accepted. asiffs is put in place by `make install`.
#
# mount(8) drops PATH from the helper's environment, so mount.fuse3's shell
# finds `asiffs` only in its default PATH (/usr/local/bin first). The test
# therefore runs in a private mount namespace where /usr/local/bin is an
# overlay with the temporary PREFIX's bin on top: nothing outside changes.
set -euo pipefail
if [[ -z "${ASIFFS_FSTAB_NS:-}" ]]; then
    exec unshare --mount --propagation private env ASIFFS_FSTAB_NS=1 bash "$0" "$@"
fi
. "$(dirname "$0")/lib.sh"
require_asiffs
[[ -x /sbin/mount.fuse3 || -x /usr/sbin/mount.fuse3 ]] || fail "mount.fuse3 missing (apt-get install fuse3)"

MIB=$((1 << 20))
cd "$TESTDIR"
mkdir -p src mnt prefix
SRC="$TESTDIR/src"
MNT="$TESTDIR/mnt"
INSTALLED="$TESTDIR/prefix/bin/asiffs"

make -s -C "$REPO_ROOT" install ASIFFS="$ASIFFS" PREFIX="$TESTDIR/prefix" >make.out 2>&1 \
    || { cat make.out >&2; fail "make install failed"; }
mount -t overlay overlay -o "lowerdir=$TESTDIR/prefix/bin:/usr/local/bin" /usr/local/bin
found="$(env -i /bin/sh -c 'command -v asiffs')"
assert_eq /usr/local/bin/asiffs "$found" "asiffs as mount.fuse3's shell finds it"
cmp -s "$found" "$INSTALLED" || fail "$found is not the asiffs just installed"

"$INSTALLED" create src/a.asif --size 64M >/dev/null
head -c $MIB /dev/urandom >one
head -c $MIB /dev/urandom >two

# cmdline PID: the process's arguments, one per line.
cmdline() { tr '\0' '\n' <"/proc/$1/cmdline"; }

# umount_and_wait: unmount MNT with umount(8) and wait (30 s at most) for
# the server to flush and exit.
umount_and_wait() {
    local pid i
    pid="$(server_pid "$MNT")"
    umount "$MNT"
    for ((i = 0; i < 300; i++)); do
        [[ -e /proc/$pid ]] || break
        sleep 0.1
    done
    [[ ! -e /proc/$pid ]] || fail "server $pid still running 30 s after umount"
    ! mountpoint -q "$MNT" || fail "$MNT still mounted"
}

# --- mount -t fuse.asiffs ------------------------------------------------------
mount -t fuse.asiffs "$SRC" "$MNT" -o cache=writeback,nofail
mountpoint -q "$MNT" || fail "mount -t fuse.asiffs returned before the mount was ready"
pid="$(server_pid "$MNT")"
# mount.fuse3 drops nofail and adds dev,suid; mount(8) adds rw.
assert_eq "asiffs
$SRC
$MNT
-o
rw,cache=writeback,dev,suid" "$(cmdline "$pid")" "the helper's command line"
assert_eq "a.img" "$(ls "$MNT")" "listing"
assert_eq $((64 * MIB)) "$(stat -c %s "$MNT/a.img")" "size of a.img"
dd if=one of="$MNT/a.img" bs=$MIB seek=1 conv=notrunc,fsync status=none
dd if="$MNT/a.img" bs=$MIB skip=1 count=1 status=none | cmp - one || fail "read back through mount -t"
umount_and_wait
assert_check_clean src/a.asif "after mount -t fuse.asiffs"
echo "PASS mount -t fuse.asiffs"

# --- an fstab line -----------------------------------------------------------
printf '%s %s fuse.asiffs defaults,nofail,_netdev,x-systemd.automount,noauto,cache=none,allow_other 0 0\n' \
    "$SRC" "$MNT" >fstab
mount --fstab "$TESTDIR/fstab" "$MNT"
mountpoint -q "$MNT" || fail "mount --fstab returned before the mount was ready"
grep -Eq " $MNT .*[ ,]allow_other(,|$)" /proc/self/mountinfo \
    || fail "allow_other did not reach the kernel: $(grep " $MNT " /proc/self/mountinfo)"
dd if="$MNT/a.img" bs=$MIB skip=1 count=1 status=none | cmp - one || fail "data of the first mount, through fstab"
dd if=two of="$MNT/a.img" bs=$MIB seek=2 conv=notrunc,fsync status=none
dd if="$MNT/a.img" bs=$MIB skip=2 count=1 status=none | cmp - two || fail "read back through fstab"
umount_and_wait
assert_check_clean src/a.asif "after the fstab mount"
echo "PASS fstab line"

# --- the helper form, with what mount.fuse3 and mount(8) may let through -------
"$INSTALLED" "$SRC" "$MNT" -o defaults,rw,auto,nofail,_netdev,user,x-systemd.requires=a.service,comment=x,dev,suid
mountpoint -q "$MNT" || fail "asiffs SRC MNT returned before the mount was ready"
dd if="$MNT/a.img" bs=$MIB skip=2 count=1 status=none | cmp - two || fail "data through asiffs SRC MNT"
umount_and_wait
echo "PASS asiffs SOURCE MOUNTPOINT -o fstab options"

# --- a bad source fails mount(8) with asiffs' own message ---------------------
rc=0
mount -t fuse.asiffs "$TESTDIR/missing" "$MNT" 2>err || rc=$?
assert_eq 1 "$rc" "exit status of mount with a missing source"
assert_eq "asiffs: source $TESTDIR/missing: No such file or directory (os error 2)" "$(cat err)" "its message"
! mountpoint -q "$MNT" || fail "mounted anyway"
echo "PASS missing source refused"
