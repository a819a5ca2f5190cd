#!/usr/bin/env bash
# Stand-in for the asiffs binary, used only to test the bench harness itself
# while the real mount is not ready:
#   ASIFFS=bench/selftest/fake-asiffs.sh BENCH_NO_BUILD=1 BENCH_QUICK=1 bench/run.sh
# "images" are raw sparse files; `mount` bind-mounts the directory (NAME.img
# are symlinks created next to NAME.asif); `serve` runs qemu-nbd on the first
# image of the directory.  Figures it produces mean nothing.
set -euo pipefail
cmd=${1:-}; shift || true
case $cmd in
--help|-h|help) echo "fake asiffs: create|mount|serve|umount|stats|info|convert"; exit 0 ;;
create)
    [[ ${1:-} == --help ]] && exit 0
    f=$1; shift; [[ $1 == --size ]]; size=$2
    rm -f "$f"; truncate -s "$size" "$f"
    # NAME.asif and NAME.dmg (the udrw target) both show up as NAME.img
    b=$(basename "$f"); ln -sfn "$b" "$(dirname "$f")/${b%.*}.img" ;;
mount)
    if [[ ${1:-} == --help ]]; then
        # FAKE_ASIFFS_CACHE=1 plays a binary that has the container cache option
        [[ ${FAKE_ASIFFS_CACHE:-0} == 1 ]] && echo "  -o cache=none|writeback  container cache mode"
        # FAKE_ASIFFS_URING=1 plays a binary that has the FUSE transport option
        [[ ${FAKE_ASIFFS_URING:-0} == 1 ]] && echo "  -o uring=auto|on|off  FUSE transport"
        exit 0
    fi
    uring=auto
    while [[ ${1:-} == -* ]]; do
        case $1 in
        -f) shift ;;
        -o) echo "fake asiffs mount: -o $2" >&2
            [[ $2 == *uring=* ]] && uring=${2##*uring=} && uring=${uring%%,*}
            shift 2 ;;
        *) shift 2 ;;   # --threads N and the like
        esac
    done
    dir=$1 mnt=$2
    # the transport it would have had, for `stats` (a file in the image directory, seen through the mount)
    if [[ ${FAKE_ASIFFS_URING:-0} == 1 ]]; then
        tr=classic
        [[ $uring == on || ($uring == auto && $(cat /sys/module/fuse/parameters/enable_uring 2>/dev/null) == Y) ]] && tr=uring
        echo "$tr" > "$dir/.fake-transport"
    else
        rm -f "$dir/.fake-transport"
    fi
    mount --bind "$dir" "$mnt"
    trap 'exit 0' TERM
    while mountpoint -q "$mnt"; do sleep 0.05; done ;;
serve)
    if [[ ${1:-} == --help ]]; then
        [[ ${FAKE_ASIFFS_CACHE:-0} == 1 ]] && echo "      --cache <none|writeback>"
        exit 0
    fi
    sock= pidf= cache=writeback
    while [[ ${1:-} == -* ]]; do
        case $1 in
        --socket) sock=$2 ;;
        --pid-file) pidf=$2 ;;
        --cache) cache=$2 ;;
        esac
        shift 2   # --log FILE and the like
    done
    # qemu-nbd serves the first image under its export name; --fork returns once listening
    img=$(find "$1" -maxdepth 1 -name '*.asif' | sort | head -1)
    qemu-nbd -f raw --persistent --shared=8 --discard=unmap --cache="$cache" \
        -x "$(basename "$img" .asif)" --socket="$sock" --pid-file="$pidf" --fork "$img" ;;
umount)
    [[ ${1:-} == --help ]] && exit 0
    umount "$1" ;;
stats)
    # a bind mount has no counters: report none rather than pretend passthrough
    [[ ${1:-} == --help ]] && exit 0
    [[ ${1:-} == --pretty ]] && shift
    tr=$(cat "$1/.fake-transport" 2>/dev/null) || { echo '{}'; exit 0; }
    if [[ -n ${2:-} ]]; then echo "{\"transport\": \"$tr\"}"
    else echo "{\"bench.img\": {\"transport\": \"$tr\"}}"; fi ;;
info)
    [[ ${1:-} == --help ]] && exit 0
    stat "$1" >/dev/null ;;
convert)
    [[ ${1:-} == --help ]] && exit 0
    cp --sparse=always "$1" "$2" ;;
*) echo "unknown command $cmd" >&2; exit 2 ;;
esac
