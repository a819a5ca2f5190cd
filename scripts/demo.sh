#!/usr/bin/env bash
# `make demo`: create an 8G ASIF image, put a filesystem in it, mount it with
# asiffs and show that the mount holds a large, sparse disk.
set -euo pipefail
cd "$(dirname "$0")/.."

ASIFFS="${ASIFFS:-$(pwd)/target/release/asiffs}"
IMAGES=demo/images
MNT=demo/mnt
LOG=demo/mount.log

if mountpoint -q "$MNT" 2>/dev/null; then
    echo "demo: $MNT is already mounted; unmounting it to start over"
    "$ASIFFS" umount "$MNT" || fusermount3 -u "$MNT"
fi
mkdir -p "$IMAGES" "$MNT"

echo "\$ asiffs create $IMAGES/disk.asif --size 8G"
"$ASIFFS" create "$IMAGES/disk.asif" --size 8G --force
"$ASIFFS" info "$IMAGES/disk.asif"

echo "\$ asiffs mount $IMAGES $MNT"
"$ASIFFS" mount "$IMAGES" "$MNT" >"$LOG" 2>&1 &
pid=$!
for ((i = 0; i < 200; i++)); do
    mountpoint -q "$MNT" && break
    if ! kill -0 "$pid" 2>/dev/null && ! mountpoint -q "$MNT"; then
        echo "demo: asiffs mount exited before mounting; its output:" >&2
        cat "$LOG" >&2
        exit 1
    fi
    sleep 0.05
done
mountpoint -q "$MNT" || { echo "demo: $MNT not mounted after 10s" >&2; cat "$LOG" >&2; exit 1; }

# The mount shows SOURCE/NAME.asif as NAME.img, a file holding its virtual disk.
disk="$MNT/disk.img"
[[ -f "$disk" ]] || { echo "demo: $disk not found; the mount shows:" >&2; ls -la "$MNT" >&2; exit 1; }

echo "\$ mkfs.ext4 -q -F $disk      # write a filesystem into the virtual disk"
mkfs.ext4 -q -F "$disk"
sync "$disk"

echo "\$ ls -l $MNT"
ls -l "$MNT"
echo "\$ du -h $MNT/*            # space the disk really uses"
du -h "$MNT"/*
echo "\$ ls -ls $IMAGES"
ls -ls "$IMAGES"

echo
echo "demo: $MNT stays mounted. Unmount it with:"
echo "    $ASIFFS umount $MNT"
