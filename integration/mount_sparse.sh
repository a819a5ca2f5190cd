#!/usr/bin/env bash
# SEEK_DATA/SEEK_HOLE give the chunk map; fallocate punch / zero-range /
# allocate work at any alignment and length (including >= 2 GiB) and never
# answer ENOSYS; du follows; everything survives a remount. A raw reference
# file gets the same operations and must read the same.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
require_asiffs

MIB=$((1 << 20))
GIB=$((1 << 30))
SIZE=$((4 * GIB))
cd "$TESTDIR"
mkdir -p src mnt
"$ASIFFS" create src/s.asif --size 4G
truncate -s $SIZE ref.raw
"$ASIFFS" mount src mnt
IMG=mnt/s.img

# both CMD...: run a command with FILE replaced by the image, then by ref.raw.
both() {
    local f a out
    for f in "$IMG" ref.raw; do
        out=()
        for a in "$@"; do out+=("${a//FILE/$f}"); done
        "${out[@]}" || fail "$* on $f"
    done
}
pwrite() { # pwrite OFFSET LEN BYTE: write LEN bytes of BYTE at OFFSET to both files
    both python3 -c 'import os,sys; fd=os.open(sys.argv[1],os.O_WRONLY); os.pwrite(fd, bytes([int(sys.argv[4])])*int(sys.argv[3]), int(sys.argv[2])); os.fsync(fd)' FILE "$@"
}
extents() { # extents FILE: "start-end" data extents by SEEK_DATA/SEEK_HOLE
    python3 - "$1" <<'PY'
import errno, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY); size = os.fstat(fd).st_size; pos = 0; out = []
while pos < size:
    try:
        s = os.lseek(fd, pos, os.SEEK_DATA)
    except OSError as e:
        assert e.errno == errno.ENXIO, e; break
    e = os.lseek(fd, s, os.SEEK_HOLE); out.append(f"{s}-{e}"); pos = e
for whence in (os.SEEK_DATA, os.SEEK_HOLE):   # at or past the end: ENXIO
    try:
        os.lseek(fd, size, whence); sys.exit("no ENXIO at end of file")
    except OSError as e:
        assert e.errno == errno.ENXIO, e
print(" ".join(out))
PY
}
du_kb() { du -k "$1" | cut -f1; }
same() { assert_same_content "$IMG" ref.raw; }

# --- chunk map ---------------------------------------------------------------
assert_eq "" "$(extents $IMG)" "extents of an empty image"
pwrite 0 4096 1
pwrite $((5 * MIB + 100)) 1000 2
pwrite $((100 * MIB)) $((3 * MIB)) 3
pwrite $((GIB + MIB - 10)) 20 4                  # straddles a chunk boundary
want="0-$MIB $((5 * MIB))-$((6 * MIB)) $((100 * MIB))-$((103 * MIB)) $GIB-$((GIB + 2 * MIB))"
assert_eq "$want" "$(extents $IMG)" "chunk map"
python3 -c '
import errno, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
assert os.lseek(fd, 200 << 20, os.SEEK_HOLE) == 200 << 20      # in a hole: itself
assert os.lseek(fd, (5 << 20) + 7, os.SEEK_DATA) == (5 << 20) + 7
try:
    os.lseek(fd, (1 << 30) + (2 << 20), os.SEEK_DATA); sys.exit("data after the last chunk?")
except OSError as e:
    assert e.errno == errno.ENXIO
' $IMG || fail "SEEK_DATA/SEEK_HOLE edge cases"
same
echo "PASS SEEK_DATA/SEEK_HOLE give the chunk map"

# --- punch ---------------------------------------------------------------------
before=$(du_kb src/s.asif)
both fallocate --punch-hole -o $((100 * MIB)) -l $((3 * MIB)) FILE
sync
after=$(du_kb src/s.asif)
[[ $after -le $((before - 3 * 1024)) ]] || fail "punching 3 MiB: du ${before} -> ${after} KiB"
assert_eq "0-$MIB $((5 * MIB))-$((6 * MIB)) $GIB-$((GIB + 2 * MIB))" "$(extents $IMG)" "map after punch"
# inside one chunk, unaligned: must not be refused (qemu-storage-daemon says EOPNOTSUPP)
both fallocate --punch-hole -o $((5 * MIB + 300)) -l 333 FILE
both fallocate --punch-hole -o 1 -l 4000 FILE
same
echo "PASS punch: du ${before} -> ${after} KiB; sub-chunk unaligned punches work"

# --- zero range, allocate, grow -------------------------------------------------
pwrite $((2 * GIB)) $((2 * MIB)) 5
both fallocate --zero-range -o $((2 * GIB + 12345)) -l $((MIB + 777)) FILE
both fallocate --zero-range --keep-size -o $((SIZE - 1000)) -l 5000 FILE
both fallocate -o $((3 * GIB + 5)) -l $((3 * MIB)) FILE          # mode 0: allocate
both fallocate --keep-size -o $((SIZE - MIB)) -l $((4 * MIB)) FILE
same
assert_eq $SIZE "$(stat -c %s $IMG)" "size after keep-size fallocate past the end"
both fallocate -o $((SIZE - MIB)) -l $((3 * MIB)) FILE            # grows the file
assert_eq $((SIZE + 2 * MIB)) "$(stat -c %s $IMG)" "size after fallocate past the end"
SIZE=$((SIZE + 2 * MIB))
same
rc=0
fallocate --collapse-range -o 0 -l $MIB $IMG 2>err.txt || rc=$?
[[ $rc -ne 0 ]] && grep -q "not supported" err.txt || fail "collapse-range should be EOPNOTSUPP: $(cat err.txt)"
echo "PASS zero-range, allocate (mode 0, keep-size, growing); other modes EOPNOTSUPP"

# --- >= 2 GiB ranges ---------------------------------------------------------------
pwrite $((GIB / 2)) $MIB 6
pwrite $((3 * GIB + 7)) 5000 7
both fallocate --punch-hole -o $((MIB / 2)) -l $((3 * GIB + 17)) FILE
both fallocate --zero-range -o $((3 * GIB + 5 * MIB)) -l $((SIZE - 3 * GIB - 5 * MIB)) FILE
same
small=$(du_kb src/s.asif)
both fallocate --punch-hole -o 0 -l $SIZE FILE
sync
assert_eq "" "$(extents $IMG)" "map after punching everything"
[[ $(du_kb src/s.asif) -le $small ]] || fail "du grew after punching everything"
echo "PASS punch and zero-range of >= 2 GiB at odd offsets; du $(du_kb src/s.asif) KiB"

# --- survives remount ------------------------------------------------------------------
pwrite $((7 * MIB + 1)) 9999 8
both fallocate --punch-hole -o $((7 * MIB + 500)) -l 100 FILE
"$ASIFFS" umount mnt
assert_exit 0 "$ASIFFS" check src/s.asif
"$ASIFFS" mount src mnt
same
assert_eq "$((7 * MIB))-$((8 * MIB))" "$(extents $IMG)" "map after remount"
"$ASIFFS" umount mnt
echo "PASS writes and punches survive remount; image checks clean"

# --- an independent reader agrees ------------------------------------------------------
# Every chunk is fully valid or unmapped (asiffs never writes partial ones),
# which is all dissect.hypervisor understands.
require_python_dissect
"$PYTHON" "$DISSECT_READ" src/s.asif dissect.raw
cmp dissect.raw ref.raw || fail "dissect.hypervisor reads the image differently from the raw reference"
echo "PASS dissect.hypervisor reads the written image identically"
