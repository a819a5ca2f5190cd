#!/usr/bin/env bash
# ext4 on a loop device over a mounted image: files survive an asiffs
# remount, and fstrim after deleting them gives the space back to the host
# (the container shrinks to about what ext4 still uses).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
require_asiffs
for t in mkfs.ext4 losetup fstrim; do command -v $t >/dev/null || fail "$t missing (e2fsprogs, util-linux)"; done

cd "$TESTDIR"
mkdir -p src mnt ext files
LOOP=""
cleanup_loop() {
    mountpoint -q ext && umount ext || true
    [[ -n "$LOOP" ]] && losetup -d "$LOOP" 2>/dev/null || true
    LOOP=""
}
trap 'cleanup_loop; _lib_cleanup' EXIT

# 3G: mkfs's whole-device discard is then one punch of more than 2 GiB.
"$ASIFFS" create src/disk.asif --size 3G
"$ASIFFS" mount src mnt

attach() { # attach [DIRECT]: loop device over mnt/disk.img, ext4 mounted on ext
    LOOP="$(losetup --find --show ${1:+--direct-io=on} mnt/disk.img)"
    mount "$LOOP" ext
}
detach() {
    umount ext
    losetup -d "$LOOP"
    LOOP=""
}

LOOP="$(losetup --find --show mnt/disk.img)"
mkfs.ext4 -q -F "$LOOP" || fail "mkfs.ext4 on the exposed file"
mount "$LOOP" ext

# Files: some large random ones, many small ones.
for i in $(seq 1 12); do head -c $((((i * 7) % 13 + 1) << 20)) /dev/urandom >"files/big$i"; done
for i in $(seq 1 200); do head -c $((i * 37)) /dev/urandom >"files/small$i"; done
cp -r files ext/
(cd files && sha256sum * >../files.sha256)
sync -f ext
detach
"$ASIFFS" umount mnt
assert_exit 0 "$ASIFFS" check src/disk.asif
echo "PASS mkfs.ext4 + copy on the exposed file; image checks clean"

# Remount (this time the loop device uses O_DIRECT, as QEMU cache=none would).
"$ASIFFS" mount src mnt
attach direct
(cd ext/files && sha256sum -c --quiet ../../files.sha256) || fail "checksums after remount"
echo "PASS checksums match after asiffs remount (loop with direct I/O)"

du_kb() { du -k "$1" | cut -f1; }
before=$(du_kb src/disk.asif)
rm -f ext/files/big*
sync -f ext
fstrim -v ext
sync -f ext
detach
# The punches are durable once the server flushes (umount waits for it).
"$ASIFFS" umount mnt
after=$(du_kb src/disk.asif)
"$ASIFFS" mount src mnt
attach
used=$(df -k --output=used ext | tail -n1)
detach
log "container: ${before} KiB before, ${after} KiB after fstrim; ext4 reports ${used} KiB used"
[[ $after -lt $((before - 40 * 1024)) ]] || fail "fstrim did not shrink the container (${before} -> ${after} KiB)"
# ext4 metadata (journal, inode tables) counts as used; allow 16 MiB for the
# container's own index and partly used chunks.
[[ $after -le $((used + 16 * 1024)) ]] || fail "container ${after} KiB is well above the ${used} KiB in use"
echo "PASS fstrim: container $before -> $after KiB (ext4 uses $used KiB)"

attach
(cd ext/files && sha256sum -c --quiet <(grep small ../../files.sha256)) || fail "remaining files damaged by fstrim"
detach
"$ASIFFS" umount mnt
assert_exit 0 "$ASIFFS" check src/disk.asif
echo "PASS remaining files intact; image checks clean"
