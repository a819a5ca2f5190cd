#!/usr/bin/env bash
# The real images of ../shared/vectors/real (made by hdiutil, not by us)
# through one directory mount: each reads with the disk SHA-256 its README
# states; a write into hdiutil's raw UDRW .dmg survives a remount and lands
# in the .dmg itself, byte for byte.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
require_asiffs

REAL="$VECTORS/real"
cd "$TESTDIR"
mkdir -p src mnt
gzip -dc "$REAL/udrw-hfsplus.dmg.gz" >src/udrw.dmg
gzip -dc "$REAL/udsp-hfsplus.sparseimage.gz" >src/udsp.sparseimage
mkdir -p stage
tar -xzf "$REAL/udsb-hfsplus.sparsebundle.tar.gz" -C stage
bundle="$(find stage -maxdepth 2 -name '*.sparsebundle' -type d | head -n 1)"
[[ -n "$bundle" ]] || fail "no .sparsebundle in udsb-hfsplus.sparsebundle.tar.gz"
mv "$bundle" src/udsb.sparsebundle
cp "$REAL/udzo-mbr-two-fat16.dmg" src/udzo.dmg

declare -A want=(
    [udrw]=57d8a84dc9edf632f478ee0699ca91dd616de0139e7a87fc0d587eb6f5c6aab7
    [udsp]=ca3f866acde4efa5ff4c010f1f044ccc72135a92114bafdcc53644e0a093acbf
    [udsb]=69fd05ee19642670734e25fd7c5f930fb11bb794bb04eb03411530cf25bd9bb8
    [udzo]=0786ad1fdcba31a3f03ee80eb1d6e8c7ee2f4647a2b4b6f1855c9fe0719784de
)
declare -A size=([udrw]=655360 [udsp]=40960000 [udsb]=40960000 [udzo]=5242880)

"$ASIFFS" mount src mnt --log "$TESTDIR/mount.log" 2>mount.err || fail "mount: $(cat mount.err)"
mountpoint -q mnt || fail "mount did not appear"
assert_eq "udrw.img udsb.img udsp.img udzo.img" "$(ls mnt | LC_ALL=C sort | tr '\n' ' ' | sed 's/ $//')" "names in the mount"
for n in udrw udsp udsb udzo; do
    assert_eq "${size[$n]}" "$(stat -c %s "mnt/$n.img")" "size of $n.img"
    got="$(sha256sum <"mnt/$n.img" | cut -c1-64)"
    assert_eq "${want[$n]}" "$got" "disk SHA-256 of $n.img through the mount"
    echo "PASS $n: reads as hdiutil's disk (SHA-256 ${got:0:16}...)"
done

# A write into the raw UDRW through the mount, then a remount.
head -c 70000 /dev/urandom >pattern
cp src/udrw.dmg model.raw
dd if=pattern of=mnt/udrw.img bs=1 seek=100001 conv=notrunc,fsync status=none
dd if=pattern of=model.raw bs=1 seek=100001 conv=notrunc status=none
cmp mnt/udrw.img model.raw || fail "udrw.img reads differently from the model after the write"
"$ASIFFS" umount mnt || fail "umount"
cmp src/udrw.dmg model.raw || fail "the .dmg is not the written disk byte for byte"
"$ASIFFS" mount src mnt --log "$TESTDIR/mount2.log" 2>mount2.err || fail "remount: $(cat mount2.err)"
cmp mnt/udrw.img model.raw || fail "udrw.img after the remount differs from the model"
"$ASIFFS" umount mnt || fail "umount"
echo "PASS udrw: a write through the mount survives a remount and is the .dmg's own bytes"
