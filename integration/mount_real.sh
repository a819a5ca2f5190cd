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

# --- encrypted images: one password for SOURCE, -o password-file= ---------
ENC="$REAL/encrypted"
mkdir -p esrc emnt
for f in testimage.AES-128.64k.header_v2.dmg testimage.AES-256.64k.header_v2.sparseimage \
    testimage.AES-256.64k.header_v1.dmg HFS+-UDZO-password-data.dmg; do
    cp "$ENC/$f" esrc/
done
tar -xzf "$ENC/testimage.AES-256.64k.header_v2.sparsebundle.tar.gz" -C stage
ebundle="$(find stage -maxdepth 2 -name '*.sparsebundle' -type d | grep -v aj_bundle | head -n 1)"
[[ -n "$ebundle" ]] || fail "no .sparsebundle in the encrypted bundle's archive"
mv "$ebundle" esrc/esb.sparsebundle
chmod -R u+w esrc
mv esrc/testimage.AES-128.64k.header_v2.dmg esrc/eraw.dmg
mv esrc/testimage.AES-256.64k.header_v2.sparseimage esrc/esp.sparseimage
mv esrc/testimage.AES-256.64k.header_v1.dmg esrc/ev1.dmg
mv esrc/HFS+-UDZO-password-data.dmg esrc/udzo-other-password.dmg
cp src/udrw.dmg esrc/plain.dmg
printf 'vilefault\n' >pw
chmod 600 pw
# Images we encrypt ourselves, with the same password.
"$ASIFFS" create esrc/new.dmg --size 8M --encryption aes-256 --password-file pw >/dev/null
"$ASIFFS" create esrc/newsp.sparseimage --size 8M --encryption aes-128 --password-file pw >/dev/null
"$ASIFFS" create esrc/newsb.sparsebundle --size 16M --band-size 4M --encryption aes-256 --password-file pw >/dev/null
"$ASIFFS" mount esrc emnt -o password-file="$TESTDIR/pw" --log "$TESTDIR/emount.log" 2>emount.err \
    || fail "encrypted mount: $(cat emount.err)"
mountpoint -q emnt || fail "encrypted mount did not appear"
assert_eq "eraw.img esb.img esp.img ev1.img new.img newsb.img newsp.img plain.img" "$(ls emnt | LC_ALL=C sort | tr '\n' ' ' | sed 's/ $//')" \
    "names in the encrypted mount (the image with another password skipped)"
grep -q "udzo-other-password.dmg: skipped: .*wrong password" emount.err \
    || fail "the image with another password was not skipped with the reason: $(cat emount.err)"
grep -q "vilefault" emount.err emount.log 2>/dev/null && fail "the password appears in the log"
assert_eq 6fd3ed173450459fb2e838a846e9bee88c9b9e9c6a97fe554aa0a65a54ce7f12 "$(sha256sum <emnt/eraw.img | cut -c1-64)" "eraw.img"
assert_eq 9d429673a0eb8602bcf2a30af390eb14555acae3d85997e4619123096bfa1c2e "$(sha256sum <emnt/esp.img | cut -c1-64)" "esp.img"
assert_eq eb35ccf058905d535e4dbf3176ebd8d94b89fb282a4ccc7ae88f08bfc2b68b17 "$(sha256sum <emnt/esb.img | cut -c1-64)" "esb.img"
echo "PASS encrypted UDRW, sparse image and bundle read as hdiutil's disks; another password's image skipped with the reason"

# Writes through the mount: plaintext in the mount, none in the containers.
python3 -c 'import sys; sys.stdout.buffer.write((b"ENCRYPTED-MOUNT-SECRET-" * 1500)[:30000])' >secret
for n in eraw esp esb new newsp newsb; do
    cp "emnt/$n.img" "model-$n.raw"
    dd if=secret of="emnt/$n.img" bs=1 seek=1234 conv=notrunc,fsync status=none
    dd if=secret of="model-$n.raw" bs=1 seek=1234 conv=notrunc status=none
    fallocate -p -o 40000 -l 5000 "emnt/$n.img"
    fallocate -p -o 40000 -l 5000 "model-$n.raw"
    cmp "emnt/$n.img" "model-$n.raw" || fail "$n.img differs from the model after writes"
done
if printf 'x' | dd of=emnt/ev1.img bs=1 seek=0 conv=notrunc status=none 2>ev1.err; then
    fail "a version-1 encrypted image took a write"
fi
grep -q "Read-only file system" ev1.err || fail "ev1.img write: $(cat ev1.err)"
"$ASIFFS" umount emnt || fail "umount"
for c in esrc/eraw.dmg esrc/esp.sparseimage esrc/esb.sparsebundle esrc/new.dmg esrc/newsp.sparseimage esrc/newsb.sparsebundle; do
    grep -rq "ENCRYPTED-MOUNT-SECRET" "$c" && fail "plaintext found in $c"
done
"$ASIFFS" mount esrc emnt -o password-file="$TESTDIR/pw" --log "$TESTDIR/emount2.log" 2>emount2.err \
    || fail "encrypted remount: $(cat emount2.err)"
for n in eraw esp esb new newsp newsb; do
    cmp "emnt/$n.img" "model-$n.raw" || fail "$n.img after the remount differs from the model"
done
"$ASIFFS" umount emnt || fail "umount"
echo "PASS writes and punches through the mount to encrypted images (hdiutil's and ours) survive a remount; no plaintext in the containers; v1 is read-only"

# --- the same encrypted images over NBD: serve -o password-file= ----------
SOCK="$TESTDIR/enc.sock"
"$ASIFFS" serve esrc --socket "$SOCK" -o password-file="$TESTDIR/pw" --pid-file "$TESTDIR/serve.pid" \
    --log "$TESTDIR/serve.log" >serve.out 2>serve.err || fail "serve: $(cat serve.err)"
spid="$(cat "$TESTDIR/serve.pid")"
trap 'rc=$?; kill -TERM "$spid" 2>/dev/null || true; (exit $rc); _lib_cleanup' EXIT
grep -q "udzo-other-password.dmg.*wrong password" serve.err || fail "serve did not name the image it skipped: $(cat serve.err)"
for n in eraw esp esb; do
    qemu-img convert -f raw -O raw "nbd+unix:///$n?socket=$SOCK" "nbd-$n.raw" || fail "qemu-img read of export $n"
    cmp "nbd-$n.raw" "model-$n.raw" || fail "export $n reads differently from the model"
done
kill -TERM "$spid"
for ((i = 0; i < 300; i++)); do kill -0 "$spid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$spid" 2>/dev/null && fail "serve did not exit on SIGTERM"
echo "PASS serve -o password-file=: the encrypted images' exports read as the model; another password's image skipped"
