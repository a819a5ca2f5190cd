#!/usr/bin/env bash
# asiffs benchmark harness: native file vs asiffs FUSE mount (ASIF over FUSE
# over io_uring, the same on the classic /dev/fuse transport, and a raw
# UDRW .dmg served through FUSE passthrough) vs `asiffs serve`
# (NBD over a unix socket, fio's nbd engine) vs qemu-storage-daemon (qcow2 FUSE
# export), cold (host cache dropped) and warm, plus daemon CPU per
# GiB, RSS / mount-1000 / open-10T / convert figures.
# See bench/README.md.  Called by `make bench`; not part of the tests.
set -Eeuo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
ROOT=$(dirname "$BENCH_DIR")
WORK=$(realpath -m "${BENCH_WORK:-$BENCH_DIR/work}")  # canonical: compared with /proc/self/mountinfo
RESULTS=${BENCH_RESULTS:-$BENCH_DIR/results}
ASIFFS_GIVEN=${ASIFFS:+1}                    # a binary named by the caller is never rebuilt
ASIFFS=${ASIFFS:-$ROOT/target/release/asiffs}
QUICK=${BENCH_QUICK:-0}

if [[ $QUICK == 1 ]]; then
    d_size=256M d_runs=1 d_runtime=3 d_ramp=0 d_region=128M d_many=100
    d_big=1T d_bigchunks=1024 d_conv=256M d_open_runs=5 d_mount_runs=2
else
    d_size=4G d_runs=3 d_runtime=12 d_ramp=0 d_region=1G d_many=1000
    d_big=10T d_bigchunks=102400 d_conv=2G d_open_runs=20 d_mount_runs=5
fi
SIZE=${BENCH_SIZE:-$d_size}                  # working set per target (prefilled)
RUNS=${BENCH_RUNS:-$d_runs}                  # repetitions (median taken)
RUNTIME=${BENCH_RUNTIME:-$d_runtime}         # seconds per time-based fio job
RAMP=${BENCH_RAMP:-$d_ramp}                  # fio ramp_time s (its I/O is not in io_bytes but its CPU is)
REGION=${BENCH_DISCARD_REGION:-$d_region}    # discard job region (50% punched)
MANY=${BENCH_MANY:-$d_many}                  # images for the mount-many test
BIG=${BENCH_BIG_SIZE:-$d_big}                # virtual size of the big image
BIGCHUNKS=${BENCH_BIG_CHUNKS:-$d_bigchunks}  # 1 MiB chunks touched in it
CONV=${BENCH_CONVERT_SIZE:-$d_conv}          # convert input size (~50% data)
OPEN_RUNS=${BENCH_OPEN_RUNS:-$d_open_runs}
MOUNT_RUNS=${BENCH_MOUNT_RUNS:-$d_mount_runs}
TARGETS=${BENCH_TARGETS:-native asiffs classic udrw nbd qsd}
MODES=${BENCH_MODES:-cold warm}
COLD_JOBS=${BENCH_COLD_JOBS:-seqwrite seqread randwrite randread qd1read bufwrite bufread mixed}
WARM_JOBS=${BENCH_WARM_JOBS:-seqwrite seqread randwrite randread qd1read}
DISCARD=${BENCH_DISCARD:-1}
ASIFFS_CACHE_OPT=${BENCH_ASIFFS_CACHE_OPT:-auto}  # auto: use -o cache= if `mount --help` has it
NBD_CACHE_OPT=${BENCH_NBD_CACHE_OPT:-auto}        # auto: use --cache if `serve --help` has it
URING_OPT=${BENCH_ASIFFS_URING_OPT:-auto}         # auto: use -o uring= if `mount --help` has it
ASIFFS_URING=${BENCH_ASIFFS_URING:-on}            # -o uring= of target asiffs (classic: always off)
URING_KNOB=/sys/module/fuse/parameters/enable_uring
EXTRAS=${BENCH_EXTRAS:-mount open convert}
MIN_FREE_GB=${BENCH_MIN_FREE_GB:-10}
ASIFFS_MOUNT_OPTS=${BENCH_ASIFFS_MOUNT_OPTS:-}
FIO_TIMEOUT=${BENCH_FIO_TIMEOUT:-900}

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RAW=$WORK/raw/$STAMP
LOGS=$WORK/logs
TOOL=$WORK/bin/benchtool
MEAS=$RAW/measurements.jsonl

log()  { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
warn() { printf '[bench %(%H:%M:%S)T] WARNING: %s\n' -1 "$*" >&2; }
die()  { printf '[bench] FATAL: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- cleanup
declare -a CLEAN_MOUNTS=()   # mount points we created
declare -a CLEAN_PIDS=()     # daemons we started
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    local m p
    for m in "${CLEAN_MOUNTS[@]}"; do
        if is_mounted "$m" 2>/dev/null; then
            fusermount3 -u "$m" 2>/dev/null || umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
        fi
    done
    for p in "${CLEAN_PIDS[@]}"; do
        kill -0 "$p" 2>/dev/null && kill -TERM "$p" 2>/dev/null
    done
    for p in "${CLEAN_PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null
    done
    for m in "${CLEAN_MOUNTS[@]}"; do
        is_mounted "$m" 2>/dev/null && umount -l "$m" 2>/dev/null
    done
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

forget_pid() { local p=$1 i; for i in "${!CLEAN_PIDS[@]}"; do [[ ${CLEAN_PIDS[$i]} == "$p" ]] && unset 'CLEAN_PIDS[i]'; done; return 0; }

# wait_for TIMEOUT_S CMD...: poll CMD every 20 ms until it succeeds.
wait_for() {
    local t=$1; shift
    local end=$(( $(date +%s%N) + t * 1000000000 ))
    until "$@"; do
        (( $(date +%s%N) < end )) || return 1
        sleep 0.02
    done
}
# is_mounted PATH: from /proc/self/mountinfo only, so it neither blocks on a hung
# FUSE server nor misses a dead one (where `mountpoint` fails with ENOTCONN)
is_mounted() { awk -v m="$1" '$5 == m {f=1} END {exit !f}' /proc/self/mountinfo; }
not_running() { # gone, or a zombie
    kill -0 "$1" 2>/dev/null || return 0
    [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) == Z ]]
}
not_mounted() { ! is_mounted "$1"; }

drop_caches() {
    sync
    echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
}
# cold jobs are only honest if the drop works (root, and not refused by a container)
can_drop_caches() { sync; (echo 3 > /proc/sys/vm/drop_caches) 2>/dev/null; }

# after drop_caches: re-read the asiffs executable and its libraries so that
# "cold" timings measure image metadata I/O, not paging in the program
warm_binary() {
    [[ $ASIFFS_OK == 1 ]] || return 0
    cat "$ASIFFS" > /dev/null
    ldd "$ASIFFS" 2>/dev/null | awk '$(NF-1) ~ /^\// {print $(NF-1)} $1 ~ /^\// {print $1}' |
        while read -r lib; do cat "$lib" > /dev/null 2>&1 || true; done || true
    return 0
}
to_bytes() { numfmt --from=iec "$(tr -d 'iB' <<<"$1" | tr 'kmgt' 'KMGT')"; }
alloc_bytes() { if [[ -e $1 ]]; then echo $(( $(stat -c '%b * %B' "$1") )); else echo null; fi; }
now_ns() { date +%s%N; }
CLK_TCK=$(getconf CLK_TCK)

# record KEY=VALUE... -> one JSON object per line in $MEAS (values: numbers,
# null, or strings quoted by the caller through jstr)
jstr() { python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1"; }
record() {
    local out="{" sep="" kv
    for kv in "$@"; do out+="$sep\"${kv%%=*}\": ${kv#*=}"; sep=", "; done
    echo "$out}" >> "$MEAS"
}

# ---------------------------------------------------------------- setup
install_deps() {
    [[ ${BENCH_NO_INSTALL:-0} == 1 ]] && return 0
    local need=()
    command -v fio >/dev/null || need+=(fio)
    command -v fusermount3 >/dev/null || need+=(fuse3)
    command -v jq >/dev/null || need+=(jq)
    command -v python3 >/dev/null || need+=(python3)
    command -v cc >/dev/null || need+=(gcc)
    command -v qemu-storage-daemon >/dev/null || need+=(qemu-utils)
    command -v qemu-img >/dev/null || need+=(qemu-utils)
    command -v mountpoint >/dev/null || need+=(util-linux)
    command -v numfmt >/dev/null || need+=(coreutils)
    command -v hyperfine >/dev/null || need+=(hyperfine)
    if ((${#need[@]})); then
        log "installing: ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get -o DPkg::Lock::Timeout=300 update -qq >/dev/null
        # hyperfine is optional: retry without it if it is not available
        apt-get -o DPkg::Lock::Timeout=300 install -y -qq "${need[@]}" >/dev/null ||
            apt-get -o DPkg::Lock::Timeout=300 install -y -qq "${need[@]/hyperfine/}" >/dev/null
    fi
    local c
    for c in fio fusermount3 python3 cc qemu-storage-daemon qemu-img mountpoint numfmt; do
        command -v "$c" >/dev/null || die "missing required tool: $c"
    done
}

build_tool() {
    mkdir -p "$WORK/bin"
    if [[ ! -x $TOOL || $BENCH_DIR/benchtool.c -nt $TOOL ]]; then
        cc -O2 -Wall -o "$TOOL" "$BENCH_DIR/benchtool.c"
    fi
}

ASIFFS_OK=0
ASIFFS_SRC=${ASIFFS}
build_asiffs() {
    if [[ ${BENCH_NO_BUILD:-0} != 1 && -f $ROOT/Cargo.toml && -z ${BENCH_ASIFFS_PREBUILT:-} && -z $ASIFFS_GIVEN ]]; then
        log "cargo build --release"
        (cd "$ROOT" && cargo build --release 2>&1 | tail -3) >&2 || true
    fi
    if [[ -x $ASIFFS ]] && "$ASIFFS" --help >/dev/null 2>&1; then
        ASIFFS_OK=1
        # snapshot the binary: a concurrent `cargo build` must not change it mid-run
        if [[ ${BENCH_NO_SNAPSHOT:-0} != 1 ]]; then
            cp -f "$ASIFFS" "$WORK/bin/asiffs.tmp" && mv -f "$WORK/bin/asiffs.tmp" "$WORK/bin/asiffs"
            ASIFFS_SRC=$ASIFFS
            ASIFFS=$WORK/bin/asiffs
        fi
    else
        warn "asiffs binary not usable at $ASIFFS: asiffs columns will be n/a"
    fi
}

# cache_ok MARKER IMAGE: a cached image set is reused only if it was completed
# and the asiffs under test can read it (`asiffs info`)
cache_ok() {
    [[ -e $1 ]] || return 1
    has_subcmd info || return 0
    timeout 60 "$ASIFFS" info "$2" >/dev/null 2>&1
}
has_subcmd() { [[ $ASIFFS_OK == 1 ]] && "$ASIFFS" "$1" --help >/dev/null 2>&1; }

# asiffs create with a size spelled like 2G / 10T (falls back to bytes)
asiffs_create() {
    local f=$1 size=$2
    rm -f "$f"
    "$ASIFFS" create "$f" --size "$size" >/dev/null 2>>"$LOGS/asiffs-create.log" ||
        "$ASIFFS" create "$f" --size "$(to_bytes "$size")" >/dev/null 2>>"$LOGS/asiffs-create.log"
}

# ---------------------------------------------------------------- mounts
# asiffs: start `asiffs mount -f DIR MNT` in the background; sets ASIFFS_PID,
# or the variable named by PIDVAR (the udrw mount is live beside the asiffs one,
# so each keeps its own pid).
ASIFFS_PID=
CLASSIC_PID=
UDRW_PID=
asiffs_mount() {
    local dir=$1 mnt=$2 expect=${3:-} extra=${4:-} pidvar=${5:-ASIFFS_PID}
    mkdir -p "$mnt"
    not_mounted "$mnt" || die "$mnt is already a mount point"
    # shellcheck disable=SC2086
    "$ASIFFS" mount -f $ASIFFS_MOUNT_OPTS $extra "$dir" "$mnt" >>"$LOGS/asiffs-mount.log" 2>&1 &
    printf -v "$pidvar" %s "$!"
    CLEAN_PIDS+=("$!"); CLEAN_MOUNTS+=("$mnt")
    if ! wait_for 30 is_mounted "$mnt"; then
        warn "asiffs mount of $dir did not appear within 30 s (see $LOGS/asiffs-mount.log)"
        asiffs_unmount "$mnt" "$pidvar"
        return 1
    fi
    if [[ -n $expect ]] && ! wait_for 10 timeout -s KILL 5 test -e "$mnt/$expect"; then
        warn "asiffs mount: $mnt/$expect did not appear"
        asiffs_unmount "$mnt" "$pidvar"
        return 1
    fi
}
asiffs_unmount() { # MNT [PIDVAR]
    local mnt=$1 pidvar=${2:-ASIFFS_PID} pid
    pid=${!pidvar}
    if is_mounted "$mnt"; then
        timeout 30 "$ASIFFS" umount "$mnt" >/dev/null 2>&1 || fusermount3 -u "$mnt" 2>/dev/null || umount "$mnt" 2>/dev/null || true
    fi
    if [[ -n $pid ]]; then
        wait_for 15 not_running "$pid" || { warn "asiffs pid $pid still alive after unmount, killing"; kill -TERM "$pid" 2>/dev/null; wait_for 5 not_running "$pid" || kill -KILL "$pid" 2>/dev/null; }
        wait "$pid" 2>/dev/null || true
        forget_pid "$pid"
    fi
    is_mounted "$mnt" && umount -l "$mnt" 2>/dev/null
    printf -v "$pidvar" %s ""
    return 0
}

# timed_mount DIR MNT N TIMEOUT: start `asiffs mount -f DIR MNT` and measure the
# time until MNT is a mount point listing >= N entries.  Sets TM_RES="ms count"
# and ASIFFS_PID (the caller unmounts with asiffs_unmount).
TM_RES=
timed_mount() {
    local dir=$1 mnt=$2 n=$3 to=$4 t0
    mkdir -p "$mnt"
    not_mounted "$mnt" || die "$mnt is already a mount point"
    t0=$(now_ns)
    # shellcheck disable=SC2086
    "$ASIFFS" mount -f $ASIFFS_MOUNT_OPTS "$dir" "$mnt" >>"$LOGS/asiffs-mount.log" 2>&1 &
    ASIFFS_PID=$!
    CLEAN_PIDS+=("$ASIFFS_PID"); CLEAN_MOUNTS+=("$mnt")
    TM_RES=$("$TOOL" waitmount "$mnt" "$n" "$to" "$t0" "$ASIFFS_PID" 2>>"$LOGS/waitmount.log")
}

# asiffs serve: NBD export of DIR on a unix socket; returns once listening
# (it detaches and writes its pid).  Sets NBD_PID.
NBD_PID=
nbd_start() {
    local dir=$1 sock=$2 extra=${3:-} pidf=$T_NBD/serve.pid
    rm -f "$sock" "$pidf"
    # shellcheck disable=SC2086
    if ! timeout 60 "$ASIFFS" serve --socket "$sock" --pid-file "$pidf" --log "$LOGS/asiffs-serve.log" \
            $extra "$dir" >>"$LOGS/asiffs-serve.log" 2>&1; then
        warn "asiffs serve of $dir failed (see $LOGS/asiffs-serve.log)"
        [[ -s $pidf ]] && kill -TERM "$(cat "$pidf")" 2>/dev/null
        return 1
    fi
    NBD_PID=$(cat "$pidf")
    CLEAN_PIDS+=("$NBD_PID")
    [[ -S $sock ]] || { warn "asiffs serve: no socket at $sock"; nbd_stop; return 1; }
}
nbd_stop() {
    local pid=$NBD_PID
    if [[ -n $pid ]]; then
        kill -TERM "$pid" 2>/dev/null   # it flushes every image, then exits
        wait_for 30 not_running "$pid" || { warn "asiffs serve pid $pid still alive, killing"; kill -KILL "$pid" 2>/dev/null; }
        forget_pid "$pid"
    fi
    NBD_PID=
    return 0
}

# qemu-storage-daemon FUSE export of a qcow2; MNT must be an existing regular file.
QSD_PID=
qsd_start() {
    local img=$1 mnt=$2 direct=${3:-on}
    touch "$mnt"
    not_mounted "$mnt" || die "$mnt is already a mount point"
    qemu-storage-daemon \
        --blockdev "driver=file,filename=$img,node-name=file,cache.direct=$direct,discard=unmap" \
        --blockdev "driver=qcow2,file=file,node-name=qcow2,discard=unmap" \
        --export "type=fuse,id=exp,node-name=qcow2,mountpoint=$mnt,writable=on" \
        >>"$LOGS/qsd.log" 2>&1 &
    QSD_PID=$!
    CLEAN_PIDS+=("$QSD_PID"); CLEAN_MOUNTS+=("$mnt")
    wait_for 30 is_mounted "$mnt" || { warn "qsd export did not appear (see $LOGS/qsd.log)"; qsd_stop "$mnt"; return 1; }
}
qsd_stop() {
    local mnt=$1 pid=$QSD_PID
    if [[ -n $pid ]]; then
        kill -TERM "$pid" 2>/dev/null
        wait_for 30 not_running "$pid" || kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null || true
        forget_pid "$pid"
    fi
    is_mounted "$mnt" && { fusermount3 -u "$mnt" 2>/dev/null || umount -l "$mnt"; }
    QSD_PID=
    return 0
}

# ---------------------------------------------------------------- targets
# Each target has: target_file (what fio hits; for nbd its NBD URI), container (whose allocation
# we measure), create (fresh container), serve/unserve (mount or daemon with
# the cache setting of a mode), remove.
declare -A TFILE TCONT
T_NATIVE=$WORK/native
T_ASIFFS=$WORK/asiffs
T_QSD=$WORK/qsd
T_NBD=$WORK/nbd
T_UDRW=$WORK/udrw
T_CLASSIC=$WORK/classic
TFILE[native]=$T_NATIVE/bench.raw;        TCONT[native]=$T_NATIVE/bench.raw
TFILE[asiffs]=$T_ASIFFS/mnt/bench.img;    TCONT[asiffs]=$T_ASIFFS/images/bench.asif
TFILE[udrw]=$T_UDRW/mnt/bench.img;        TCONT[udrw]=$T_UDRW/images/bench.dmg
TFILE[classic]=$T_CLASSIC/mnt/bench.img;  TCONT[classic]=$T_CLASSIC/images/bench.asif
TFILE[qsd]=$T_QSD/export;                 TCONT[qsd]=$T_QSD/bench.qcow2
TFILE[nbd]="nbd+unix:///bench?socket=$T_NBD/nbd.sock"; TCONT[nbd]=$T_NBD/images/bench.asif

create_target() {
    case $1 in
    native)
        mkdir -p "$T_NATIVE"; rm -f "${TFILE[native]}"
        truncate -s "$SIZE" "${TFILE[native]}" ;;
    asiffs)
        mkdir -p "$T_ASIFFS/images" "$T_ASIFFS/mnt"
        rm -f "$T_ASIFFS"/images/*
        asiffs_create "${TCONT[asiffs]}" "$SIZE" || { warn "asiffs create failed"; return 1; } ;;
    classic)
        # the asiffs target's image, served on fuser's /dev/fuse loop instead of the ring
        mkdir -p "$T_CLASSIC/images" "$T_CLASSIC/mnt"
        rm -f "$T_CLASSIC"/images/*
        asiffs_create "${TCONT[classic]}" "$SIZE" || { warn "asiffs create (classic) failed"; return 1; } ;;
    udrw)
        # a .dmg without trailer: the disk byte for byte, which asiffs hands to FUSE passthrough
        mkdir -p "$T_UDRW/images" "$T_UDRW/mnt"
        rm -f "$T_UDRW"/images/*
        asiffs_create "${TCONT[udrw]}" "$SIZE" || { warn "asiffs create (udrw .dmg) failed"; return 1; } ;;
    nbd)
        mkdir -p "$T_NBD/images"
        rm -f "$T_NBD"/images/*
        asiffs_create "${TCONT[nbd]}" "$SIZE" || { warn "asiffs create (nbd) failed"; return 1; } ;;
    qsd)
        mkdir -p "$T_QSD"; rm -f "${TCONT[qsd]}"
        qemu-img create -q -f qcow2 "${TCONT[qsd]}" "$SIZE" ;;
    esac
}
# Like with like: cold pairs asiffs cache=none, nbd --cache none and qsd
# cache.direct=on with native O_DIRECT; warm pairs cache=writeback and qsd
# cache.direct=off with native buffered.  fio opens the asiffs and qsd files
# O_DIRECT in both, and nbd has no client cache, so the only cache in play is
# the one under the daemon, as for native.
ASIFFS_HAS_CACHE=0
detect_asiffs_cache() {
    case $ASIFFS_CACHE_OPT in
    yes) ASIFFS_HAS_CACHE=1 ;;
    no)  ASIFFS_HAS_CACHE=0 ;;
    *)   [[ $ASIFFS_OK == 1 ]] && "$ASIFFS" mount --help 2>&1 | grep -qi 'writeback' && ASIFFS_HAS_CACHE=1 ;;
    esac
    return 0
}
NBD_HAS_CACHE=0
detect_nbd_cache() {
    case $NBD_CACHE_OPT in
    yes) NBD_HAS_CACHE=1 ;;
    no)  NBD_HAS_CACHE=0 ;;
    *)   [[ $ASIFFS_OK == 1 ]] && "$ASIFFS" serve --help 2>&1 | grep -q -- '--cache' && NBD_HAS_CACHE=1 ;;
    esac
    return 0
}
nbd_cache_args() { # mode -> serve arguments
    [[ $NBD_HAS_CACHE == 1 ]] || return 0
    if [[ $1 == cold ]]; then echo "--cache none"; else echo "--cache writeback"; fi
}
nbd_cache_label() {
    if [[ $NBD_HAS_CACHE == 1 ]]; then
        if [[ $1 == cold ]]; then echo none; else echo writeback; fi
    elif [[ $1 == cold ]]; then echo "writeback (serve has no --cache)"
    else echo "writeback (serve has no --cache; the default)"
    fi
}
# fio can drive nbd only with its nbd engine (libnbd)
nbd_usable() {
    [[ $ASIFFS_OK == 1 ]] || { warn "target nbd skipped: asiffs binary not usable"; return 1; }
    has_subcmd serve || { warn "target nbd skipped: asiffs has no 'serve'"; return 1; }
    fio --enghelp 2>&1 | grep -qw nbd || { warn "target nbd skipped: fio has no nbd engine"; return 1; }
}
# FUSE transport: target asiffs asks for the ring explicitly (-o uring=on, so a
# mount that cannot have it fails instead of quietly serving /dev/fuse),
# target classic for /dev/fuse (-o uring=off); udrw and the extras take the
# default (auto).  `asiffs stats` says which one each mount used.
ASIFFS_HAS_URING=0
detect_asiffs_uring() {
    case $URING_OPT in
    yes) ASIFFS_HAS_URING=1 ;;
    no)  ASIFFS_HAS_URING=0 ;;
    *)   [[ $ASIFFS_OK == 1 ]] && "$ASIFFS" mount --help 2>&1 | grep -q 'uring=' && ASIFFS_HAS_URING=1 ;;
    esac
    return 0
}
uring_args() { # target -> mount arguments
    [[ $ASIFFS_HAS_URING == 1 ]] || return 0
    case $1 in
    asiffs)  echo "-o uring=$ASIFFS_URING" ;;
    classic) echo "-o uring=off" ;;
    esac
}
uring_label() { # target -> the transport asked for
    if [[ $ASIFFS_HAS_URING != 1 ]]; then echo "default (mount has no -o uring=)"; return 0; fi
    case $1 in
    asiffs)  echo "uring=$ASIFFS_URING" ;;
    classic) echo "uring=off" ;;
    *)       echo "uring=auto" ;;
    esac
}
# the ring needs root and the kernel's switch: say so before the run, not after it
uring_precheck() {
    [[ $ASIFFS_HAS_URING == 1 && $ASIFFS_URING == on && " $TARGETS " == *" asiffs "* ]] || return 0
    local why=
    if [[ $EUID != 0 ]]; then why="FUSE over io_uring needs root"
    elif [[ ! -e $URING_KNOB ]]; then why="this kernel has no $URING_KNOB (no FUSE over io_uring)"
    elif [[ $(cat "$URING_KNOB") != Y ]]; then why="$URING_KNOB is $(cat "$URING_KNOB"): echo 1 > $URING_KNOB (make uring-on)"
    fi
    [[ -z $why ]] || die "target asiffs mounts with -o uring=on, but $why; or set BENCH_ASIFFS_URING=auto (then the report says which transport it got)"
}

asiffs_cache_args() { # mode -> mount arguments
    [[ $ASIFFS_HAS_CACHE == 1 ]] || return 0
    if [[ $1 == cold ]]; then echo "-o cache=none"; else echo "-o cache=writeback"; fi
}
asiffs_cache_label() { # mode -> what asiffs really did
    if [[ $ASIFFS_HAS_CACHE == 1 ]]; then
        if [[ $1 == cold ]]; then echo none; else echo writeback; fi
    elif [[ $1 == cold ]]; then echo "writeback (cache=none not available)"
    else echo "writeback (no cache= option; the default)"
    fi
}
native_direct() { if [[ $1 == cold ]]; then echo 1; else echo 0; fi; }
qsd_direct() { if [[ $1 == cold ]]; then echo on; else echo off; fi; }
serve_target() { # target mode
    case $1 in
    native) ;;
    asiffs) asiffs_mount "$T_ASIFFS/images" "$T_ASIFFS/mnt" bench.img "$(asiffs_cache_args "$2") $(uring_args asiffs)" ;;
    classic) asiffs_mount "$T_CLASSIC/images" "$T_CLASSIC/mnt" bench.img "$(asiffs_cache_args "$2") $(uring_args classic)" CLASSIC_PID ;;
    udrw)   asiffs_mount "$T_UDRW/images" "$T_UDRW/mnt" bench.img "$(asiffs_cache_args "$2")" UDRW_PID ;;
    qsd)    qsd_start "${TCONT[qsd]}" "${TFILE[qsd]}" "$(qsd_direct "$2")" ;;
    nbd)    nbd_start "$T_NBD/images" "$T_NBD/nbd.sock" "$(nbd_cache_args "$2")" ;;
    esac
}
unserve_target() {
    case $1 in
    native) ;;
    asiffs) asiffs_unmount "$T_ASIFFS/mnt" ;;
    classic) asiffs_unmount "$T_CLASSIC/mnt" CLASSIC_PID ;;
    udrw)   asiffs_unmount "$T_UDRW/mnt" UDRW_PID ;;
    qsd)    qsd_stop "${TFILE[qsd]}" ;;
    nbd)    nbd_stop ;;
    esac
}
remove_target() { [[ $1 != native ]] || rm -f "${TFILE[native]}"; }
daemon_pid() { case $1 in asiffs) echo "$ASIFFS_PID" ;; classic) echo "$CLASSIC_PID" ;; udrw) echo "$UDRW_PID" ;; qsd) echo "$QSD_PID" ;; nbd) echo "$NBD_PID" ;; esac; }
# cpu_ticks PID: utime + stime of all its threads, in clock ticks (null if none)
cpu_ticks() {
    local st f
    [[ -n $1 ]] && st=$(cat "/proc/$1/stat" 2>/dev/null) || { echo null; return 0; }
    read -ra f <<<"${st##*) }"   # fields from 3 (state) on; comm may hold spaces
    echo $(( f[11] + f[12] ))
}

# ---------------------------------------------------------------- fio jobs
AIO="--ioengine=libaio --direct=1"   # the discard pre-write
TB="--time_based --runtime=$RUNTIME --ramp_time=$RAMP"
job_args() { # job direct
    local aio="--ioengine=libaio --direct=$2"
    case $1 in
    fill)      echo "--rw=write --bs=1M --iodepth=16 $aio" ;;             # one pass, allocating
    seqwrite)  echo "--rw=write --bs=1M --iodepth=16 $aio $TB" ;;
    seqread)   echo "--rw=read --bs=1M --iodepth=16 $aio $TB" ;;
    randwrite) echo "--rw=randwrite --bs=4k --iodepth=32 $aio $TB" ;;
    randread)  echo "--rw=randread --bs=4k --iodepth=32 $aio $TB" ;;
    # libaio submits buffered I/O synchronously, so clat alone would miss it: also total latency
    qd1read)   echo "--rw=randread --bs=4k --iodepth=1 $aio $TB --lat_percentiles=1" ;;
    bufwrite)  echo "--rw=write --bs=1M --ioengine=psync --direct=0 --end_fsync=1 --runtime=300" ;;  # one pass
    bufread)   echo "--rw=read --bs=1M --ioengine=psync --direct=0 --runtime=300" ;;                 # one pass, cold
    mixed)     echo "--rw=randrw --rwmixread=70 --bs=16k --iodepth=16 --fsync=64 $aio $TB" ;;
    *)         return 1 ;;
    esac
}

# where fio does I/O: a file, or for nbd its engine and URI (which replaces
# libaio/psync; `direct` and the page cache have no meaning on the client side)
fio_target() { # target args...
    local t=$1; shift
    if [[ $t == nbd ]]; then
        local a out=()
        for a in "$@"; do [[ $a == --ioengine=* || $a == --direct=* ]] || out+=("$a"); done
        echo "--ioengine=nbd --uri=${TFILE[nbd]} ${out[*]}"
    else
        echo "--filename=${TFILE[$t]} $*"
    fi
}

# warm: the whole working set read once, through the same kind of open fio will use
preread() { # target direct
    local flag=; [[ $2 == 1 ]] && flag=iflag=direct
    if [[ $1 == nbd ]]; then
        # shellcheck disable=SC2046
        timeout -k 10 "$FIO_TIMEOUT" fio --name=preread $(fio_target nbd --rw=read --bs=1M --iodepth=16) \
            --size="$SIZE" --output=/dev/null >>"$LOGS/fio.log" 2>&1
        return
    fi
    timeout -k 10 "$FIO_TIMEOUT" dd if="${TFILE[$1]}" of=/dev/null bs=1M $flag status=none
}

run_fio() { # job target rep mode
    local job=$1 t=$2 rep=$3 mode=$4 out=$RAW/rep$3/$4.$1.$2.json direct=1 args pid c0 c1
    mkdir -p "$RAW/rep$rep"
    args=$(job_args "$job" 1) || { warn "unknown job $job"; return 0; }
    [[ $t == native ]] && direct=$(native_direct "$mode")
    args=$(job_args "$job" "$direct")
    if [[ $mode == cold ]]; then
        drop_caches
    else
        args+=" --invalidate=0"   # fio would otherwise drop the file's cached pages first
        sync   # start clean: no earlier job's dirty pages flushing during this one
        [[ $job == fill ]] || preread "$t" "$direct" || warn "warm-up read of $t failed"
    fi
    pid=$(daemon_pid "$t")
    c0=$(cpu_ticks "$pid")
    # shellcheck disable=SC2086
    if ! timeout -k 10 "$FIO_TIMEOUT" fio --name="$job" $(fio_target "$t" $args) --size="$SIZE" \
            --group_reporting --output-format=json --output="$out" \
            >>"$LOGS/fio.log" 2>&1; then
        warn "fio $job on $t ($mode) failed (rep $rep), see $out / $LOGS/fio.log"
        record kind='"fio_error"' mode="\"$mode\"" job="\"$job\"" target="\"$t\"" rep="$rep"
        return 0
    fi
    c1=$(cpu_ticks "$pid")
    local cpu=null
    [[ $c0 != null && $c1 != null ]] && cpu=$(( c1 - c0 ))
    record kind='"fio"' mode="\"$mode\"" job="\"$job\"" target="\"$t\"" rep="$rep" direct="$direct" \
        file="$(jstr "$out")" cpu_ticks="$cpu" clk_tck="$CLK_TCK"
}

discard_job() { # target rep
    local t=$1 rep=$2 f=${TFILE[$1]} c=${TCONT[$1]} out before after res
    out=$RAW/rep$rep/discard-write.$t.json
    mkdir -p "$RAW/rep$rep"
    # shellcheck disable=SC2046,SC2086
    timeout -k 10 "$FIO_TIMEOUT" fio --name=discard-write $(fio_target "$t" $AIO) --size="$REGION" \
        --rw=write --bs=1M --iodepth=16 --end_fsync=1 --output-format=json --output="$out" \
        >>"$LOGS/fio.log" 2>&1 || warn "discard pre-write failed on $t"
    sync
    before=$(alloc_bytes "$c")
    if [[ $t == nbd ]]; then
        res=$(nbd_punch "$rep") || res=
    else
        res=$(timeout -s KILL 600 "$TOOL" punch "$f" 0 "$REGION" 1M 2>>"$LOGS/punch.log") || res=
    fi
    if [[ -n $res ]]; then
        sync
        after=$(alloc_bytes "$c")
        record kind='"discard"' target="\"$t\"" rep="$rep" time_s="${res% *}" punched="${res#* }" \
            before="$before" after="$after"
    else
        warn "punch-hole failed on $t: $(tail -1 "$LOGS/punch.log")"
        record kind='"discard"' target="\"$t\"" rep="$rep" error="$(jstr "$(tail -1 "$LOGS/punch.log")")" before="$before"
    fi
}

# nbd_punch REP: what `benchtool punch F 0 REGION 1M` does, as NBD TRIMs (fio
# trim:1M trims 1 MiB and skips 1 MiB), then a flush; prints "seconds bytes",
# the time being fio's job runtime (so not its start-up and connect)
nbd_punch() {
    local out=$RAW/rep$1/discard-trim.nbd.json
    # shellcheck disable=SC2046
    timeout -k 10 600 fio --name=discard-trim $(fio_target nbd --rw=trim:1M --bs=1M) --size="$REGION" \
        --end_fsync=1 --output-format=json --output="$out" >>"$LOGS/fio.log" 2>&1 ||
        { echo "fio trim over nbd failed, see $out" >>"$LOGS/punch.log"; return 1; }
    python3 - "$out" 2>>"$LOGS/punch.log" <<'PY'
import json, sys
t = open(sys.argv[1]).read()
j = json.loads(t[t.index("{"):])["jobs"][0]
if j["error"] or not j["trim"]["io_bytes"]:
    sys.exit(f"fio trim over nbd: error {j['error']}, {j['trim']['io_bytes']} bytes trimmed")
print(j["job_runtime"] / 1000, j["trim"]["io_bytes"])
PY
}

# udrw_stats REP MODE AT: was the .dmg served by FUSE passthrough?  `asiffs stats`
# says so (passthrough), and reads counts the reads that reached the daemon.
udrw_stats() {
    local out=$RAW/rep$1/udrw-stats.$2.$3.json pt=null reads=null
    mkdir -p "$RAW/rep$1"
    if ! timeout 10 "$ASIFFS" stats "$T_UDRW/mnt" bench > "$out" 2>>"$LOGS/asiffs-stats.log"; then
        warn "asiffs stats of the udrw mount failed (see $LOGS/asiffs-stats.log)"
        record kind='"udrw_stats"' rep="$1" mode="\"$2\"" at="\"$3\"" passthrough=null reads=null
        return 0
    fi
    local tr=null
    read -r pt reads tr < <(python3 -c 'import json,sys
d = json.load(open(sys.argv[1]))
print(*(json.dumps(d.get(k)) for k in ("passthrough", "reads", "transport")))' "$out" 2>>"$LOGS/asiffs-stats.log") || true
    log "  udrw after $3 ($2): passthrough=$pt reads=$reads transport=$tr"
    record kind='"udrw_stats"' rep="$1" mode="\"$2\"" at="\"$3\"" passthrough="${pt:-null}" \
        reads="${reads:-null}" transport="${tr:-null}" file="$(jstr "$out")"
}

rss_of() { local v; v=$(awk -v k="$2:" '$1==k {print $2}' "/proc/$1/status" 2>/dev/null); echo "${v:-null}"; }

# ---------------------------------------------------------------- main fio loop
# Each repetition: fresh containers, prefilled in the first mode (the fill job),
# then every job of each mode round-robin over the targets, the target order
# rotating per repetition so that noise on this shared machine hits all alike.
# Daemons are restarted between modes to switch their cache setting.
run_main() {
    local -a targets=() order live up
    local t rep job i n mode last jobs pid filled
    for t in $TARGETS; do
        if [[ ($t == asiffs || $t == classic || $t == udrw) && $ASIFFS_OK != 1 ]]; then continue; fi
        if [[ $t == classic && $ASIFFS_HAS_URING != 1 ]]; then
            warn "target classic skipped: asiffs mount has no -o uring= (it would be target asiffs again)"
            continue
        fi
        if [[ $t == nbd ]] && ! nbd_usable; then continue; fi
        targets+=("$t")
    done
    n=${#targets[@]}
    last=${RUN_MODES##* }
    for ((rep = 1; rep <= RUNS; rep++)); do
        order=()
        for ((i = 0; i < n; i++)); do order+=("${targets[(i + rep - 1) % n]}"); done
        log "repetition $rep/$RUNS, order: ${order[*]}"
        live=()
        for t in "${order[@]}"; do
            if create_target "$t"; then live+=("$t"); else warn "target $t unavailable in rep $rep"; fi
        done
        filled=0
        for mode in $RUN_MODES; do
            up=()
            for t in "${live[@]}"; do
                if serve_target "$t" "$mode"; then up+=("$t")
                elif [[ $t == asiffs && $ASIFFS_HAS_URING == 1 && $ASIFFS_URING == on ]]; then
                    # the ring is the point of this target: no silent n/a columns
                    die "asiffs mount with -o uring=on failed in rep $rep ($mode): $(tail -3 "$LOGS/asiffs-mount.log" | tr '\n' ' ')"
                else warn "target $t unavailable in rep $rep ($mode)"; fi
            done
            live=("${up[@]}")
            if [[ $filled == 0 ]]; then
                for t in "${live[@]}"; do log "  $mode fill on $t"; run_fio fill "$t" "$rep" "$mode"; done
                if [[ " ${live[*]} " == *" udrw "* ]]; then udrw_stats "$rep" "$mode" fill; fi
                filled=1
            fi
            jobs=$COLD_JOBS; [[ $mode == warm ]] && jobs=$WARM_JOBS
            for job in $jobs; do
                for t in "${live[@]}"; do
                    log "  $mode $job on $t"
                    run_fio "$job" "$t" "$rep" "$mode"
                done
            done
            # discard punches holes in the working set, so it comes last
            if [[ $mode == "$last" && $DISCARD == 1 ]]; then
                for t in "${live[@]}"; do log "  discard on $t"; discard_job "$t" "$rep"; done
            fi
            for t in "${live[@]}"; do
                pid=$(daemon_pid "$t")
                if [[ $t == asiffs && -n $pid ]]; then
                    # the report checks the cache mode and the transport asiffs says it used against the labels
                    timeout 10 "$ASIFFS" stats --pretty "$T_ASIFFS/mnt" > "$RAW/rep$rep/asiffs-stats.$mode.json" 2>/dev/null &&
                        record kind='"asiffs_stats"' target='"asiffs"' rep="$rep" mode="\"$mode\"" file="$(jstr "$RAW/rep$rep/asiffs-stats.$mode.json")"
                    record kind='"rss"' rep="$rep" mode="\"$mode\"" pid="$pid" \
                        vmhwm_kib="$(rss_of "$pid" VmHWM)" vmrss_kib="$(rss_of "$pid" VmRSS)"
                fi
                if [[ $t == classic && -n $pid ]]; then
                    timeout 10 "$ASIFFS" stats --pretty "$T_CLASSIC/mnt" > "$RAW/rep$rep/classic-stats.$mode.json" 2>/dev/null &&
                        record kind='"asiffs_stats"' target='"classic"' rep="$rep" mode="\"$mode\"" file="$(jstr "$RAW/rep$rep/classic-stats.$mode.json")"
                    record kind='"rss_classic"' rep="$rep" mode="\"$mode\"" pid="$pid" vmhwm_kib="$(rss_of "$pid" VmHWM)"
                fi
                if [[ $t == udrw && -n $pid ]]; then
                    # after the reads of the mode: still 0 if the kernel served them all
                    udrw_stats "$rep" "$mode" end
                    record kind='"rss_udrw"' rep="$rep" mode="\"$mode\"" pid="$pid" vmhwm_kib="$(rss_of "$pid" VmHWM)"
                fi
                if [[ $t == nbd && -n $pid ]]; then
                    record kind='"rss_nbd"' rep="$rep" mode="\"$mode\"" pid="$pid" vmhwm_kib="$(rss_of "$pid" VmHWM)"
                fi
                if [[ $t == qsd && -n $pid ]]; then
                    record kind='"rss_qsd"' rep="$rep" mode="\"$mode\"" pid="$pid" vmhwm_kib="$(rss_of "$pid" VmHWM)"
                fi
                unserve_target "$t"
            done
        done
        for t in "${live[@]}"; do
            if [[ $t != native ]]; then
                record kind='"container_final"' target="\"$t\"" rep="$rep" bytes="$(alloc_bytes "${TCONT[$t]}")"
            fi
            remove_target "$t"
        done
    done
}

# ---------------------------------------------------------------- extras
run_mount_many() {
    [[ $ASIFFS_OK == 1 ]] || return 0
    local dir=$WORK/many/images mnt=$WORK/many/mnt marker i res
    marker=$WORK/many/.complete-$MANY
    if ! cache_ok "$marker" "$dir/img0000.asif"; then
        log "creating $MANY small images for the mount test"
        if is_mounted "$mnt"; then umount -l "$mnt"; fi
        rm -rf --one-file-system "$WORK/many"; mkdir -p "$dir"
        for ((i = 0; i < MANY; i++)); do
            asiffs_create "$(printf '%s/img%04d.asif' "$dir" "$i")" 64M || { warn "create #$i failed"; return 0; }
        done
        realpath "$ASIFFS" > "$marker"
    fi
    mkdir -p "$mnt"
    for ((i = 1; i <= MOUNT_RUNS; i++)); do
        drop_caches; warm_binary
        if timed_mount "$dir" "$mnt" "$MANY" 30; then
            record kind='"mount_many"' run="$i" ms="${TM_RES%% *}" count="${TM_RES##* }"
        else
            warn "mount of $MANY images failed/timed out: $(tail -1 "$LOGS/waitmount.log")"
            record kind='"mount_many"' run="$i" ms=null error='"timeout"'
        fi
        asiffs_unmount "$mnt"
    done
}

run_open_big() {
    [[ $ASIFFS_OK == 1 ]] || return 0
    local dir=$WORK/big/images mnt=$WORK/big/mnt img marker res i last_off stride t0 t1
    img=$dir/big.asif
    marker=$WORK/big/.complete-$BIG-$BIGCHUNKS
    mkdir -p "$dir" "$mnt"
    if ! cache_ok "$marker" "$img"; then
        log "building $BIG image with $BIGCHUNKS mapped 1 MiB chunks (4 KiB written in each)"
        rm -f "$WORK"/big/.complete-* "$dir"/*
        asiffs_create "$img" "$BIG" || { warn "asiffs create $BIG failed"; return 0; }
        asiffs_mount "$dir" "$mnt" big.img || return 0
        if res=$(cd "$WORK" && timeout -s KILL 3600 "$TOOL" sparsefill "$mnt/big.img" "$BIGCHUNKS" 1M 4K "$MIN_FREE_GB" 2>>"$LOGS/sparsefill.log"); then
            echo "$res" > "$WORK/big/fill.txt"
            asiffs_unmount "$mnt"
            realpath "$ASIFFS" > "$marker"
        else
            warn "sparse fill failed: $(tail -1 "$LOGS/sparsefill.log")"
            asiffs_unmount "$mnt"; rm -f "$img"
            return 0
        fi
    fi
    read -r _ stride < "$WORK/big/fill.txt"
    last_off=$(( (BIGCHUNKS - 1) * stride ))
    record kind='"big_image"' bytes="$(alloc_bytes "$img")" apparent="$(stat -c %s "$img")" \
        fill_s="$(awk '{print $1}' "$WORK/big/fill.txt")" chunks="$BIGCHUNKS"

    # (a) asiffs info big.asif: warm via hyperfine (or a loop), cold via a loop
    if has_subcmd info; then
        if command -v hyperfine >/dev/null; then
            hyperfine -N --warmup 3 --runs "$OPEN_RUNS" --export-json "$RAW/hyperfine-info.json" \
                "$ASIFFS info $img" >>"$LOGS/hyperfine.log" 2>&1 &&
                record kind='"info_hyperfine"' file="$(jstr "$RAW/hyperfine-info.json")"
        fi
        local ms
        for ((i = 1; i <= OPEN_RUNS; i++)); do
            "$ASIFFS" info "$img" >/dev/null 2>&1 || { warn "asiffs info failed"; break; }
            ms=$("$TOOL" timeit "$ASIFFS" info "$img") && record kind='"info_warm"' run="$i" ms="$ms"
            drop_caches; warm_binary   # cold image, warm executable
            ms=$("$TOOL" timeit "$ASIFFS" info "$img") && record kind='"info_cold"' run="$i" ms="$ms"
        done
    else
        warn "asiffs has no 'info' subcommand; skipping info timing"
    fi

    # (b) fresh mount (cold caches) -> open(2) + first 4 KiB pread of the last mapped chunk
    for ((i = 1; i <= OPEN_RUNS; i++)); do
        drop_caches; warm_binary
        if timed_mount "$dir" "$mnt" 1 30; then
            local mount_ms=${TM_RES%% *} ot
            if ot=$(timeout -s KILL 60 "$TOOL" opentime "$mnt/big.img" "$last_off" 2>>"$LOGS/opentime.log"); then
                record kind='"open_big"' run="$i" mount_ms="$mount_ms" open_us="${ot% *}" open_read_us="${ot#* }"
            else
                warn "open/read of big.img failed: $(tail -1 "$LOGS/opentime.log")"
            fi
            asiffs_unmount "$mnt"
        else
            asiffs_unmount "$mnt"
            warn "mount of big image failed"; break
        fi
    done
}

run_convert() {
    local dir=$WORK/convert in marker i t0 t1 tool
    in=$dir/in.raw
    marker=$dir/.complete-$CONV
    mkdir -p "$dir"
    if [[ ! -e $marker ]]; then
        log "creating $CONV raw input with ~50% data (4 MiB extents)"
        rm -f "$dir"/.complete-*
        "$TOOL" mkdata "$in" "$CONV" 4M >/dev/null
        touch "$marker"
    fi
    local can_asiffs=0
    has_subcmd convert && can_asiffs=1
    [[ $can_asiffs == 1 ]] || warn "asiffs convert not available; timing qemu-img only"
    for ((i = 1; i <= RUNS; i++)); do
        local -a order=(qemu asiffs)
        (( i % 2 == 0 )) && order=(asiffs qemu)
        for tool in "${order[@]}"; do
            [[ $tool == asiffs && $can_asiffs != 1 ]] && continue
            rm -f "$dir/out.asif" "$dir/out.qcow2"
            drop_caches
            t0=$(now_ns)
            if [[ $tool == qemu ]]; then
                qemu-img convert -O qcow2 "$in" "$dir/out.qcow2" && sync "$dir/out.qcow2"
            else
                "$ASIFFS" convert "$in" "$dir/out.asif" >>"$LOGS/convert.log" 2>&1 && sync "$dir/out.asif" ||
                    { warn "asiffs convert failed (see $LOGS/convert.log)"; can_asiffs=0; continue; }
            fi
            t1=$(now_ns)
            local out=$dir/out.qcow2; [[ $tool == asiffs ]] && out=$dir/out.asif
            record kind='"convert"' tool="\"$tool\"" run="$i" s="$(( (t1 - t0) / 1000 ))e-6" \
                in_bytes="$(stat -c %s "$in")" out_alloc="$(alloc_bytes "$out")"
        done
    done
    rm -f "$dir/out.asif" "$dir/out.qcow2"
}

# ---------------------------------------------------------------- go
# (all in a function, so bash has parsed the whole script before running it
# and editing run.sh during a run cannot derail that run)
main() {
    [[ -z ${BENCH_JOBS:-} ]] || die "BENCH_JOBS is gone: use BENCH_COLD_JOBS / BENCH_WARM_JOBS (and BENCH_DISCARD)"
    [[ $EUID == 0 ]] || warn "not root: no apt installs, and cold jobs are skipped (drop_caches)"
    mkdir -p "$WORK" "$RESULTS" "$RAW" "$LOGS"
    [[ $EUID == 0 ]] && install_deps
    build_tool
    build_asiffs
    detect_asiffs_cache
    detect_nbd_cache
    detect_asiffs_uring
    uring_precheck
    : > "$MEAS"
    # the cold mode needs drop_caches; without it it is skipped, and said so
    local note= m
    RUN_MODES=
    for m in $MODES; do
        case $m in
        cold) if can_drop_caches; then RUN_MODES+=" cold"
              else note="cold jobs skipped: cannot write /proc/sys/vm/drop_caches (needs root)"; warn "$note"; fi ;;
        warm) RUN_MODES+=" warm" ;;
        *) die "unknown mode $m (BENCH_MODES: cold warm)" ;;
        esac
    done
    RUN_MODES=${RUN_MODES# }
    # warm means the working set fits in the page cache
    if [[ " $RUN_MODES " == *" warm "* ]] &&
        (( $(to_bytes "$SIZE") / 1024 > $(awk '$1 == "MemAvailable:" {print $2}' /proc/meminfo) * 3 / 4 )); then
        warn "BENCH_SIZE=$SIZE does not fit well in the page cache: warm jobs will not be fully warm"
    fi
    record kind='"config"' stamp="\"$STAMP\"" quick="$QUICK" size="\"$SIZE\"" size_bytes="$(to_bytes "$SIZE")" \
        runs="$RUNS" runtime="$RUNTIME" ramp="$RAMP" region="\"$REGION\"" many="$MANY" big="\"$BIG\"" \
        bigchunks="$BIGCHUNKS" convert_size="\"$CONV\"" targets="$(jstr "$TARGETS")" \
        asiffs_ok="$ASIFFS_OK" asiffs_bin="$(jstr "$ASIFFS_SRC")" asiffs_mount_opts="$(jstr "$ASIFFS_MOUNT_OPTS")" \
        asiffs_bin_mtime="$(jstr "$(date -u -r "$ASIFFS_SRC" +%FT%TZ 2>/dev/null || echo unknown)")" \
        asiffs_bin_sha256="$(jstr "$(sha256sum "$ASIFFS" 2>/dev/null | cut -c1-16 || echo unknown)")" \
        modes="$(jstr "$RUN_MODES")" modes_note="$(jstr "$note")" cold_jobs="$(jstr "$COLD_JOBS")" warm_jobs="$(jstr "$WARM_JOBS")" \
        asiffs_cache_cold="$(jstr "$(asiffs_cache_label cold)")" asiffs_cache_warm="$(jstr "$(asiffs_cache_label warm)")" \
        nbd_cache_cold="$(jstr "$(nbd_cache_label cold)")" nbd_cache_warm="$(jstr "$(nbd_cache_label warm)")" \
        asiffs_uring="$(jstr "$(uring_label asiffs)")" classic_uring="$(jstr "$(uring_label classic)")" \
        udrw_uring="$(jstr "$(uring_label udrw)")" \
        uring_knob="$(jstr "$(cat "$URING_KNOB" 2>/dev/null || echo absent)")" \
        qsd_cache_direct_cold='"on"' qsd_cache_direct_warm='"off"' native_direct_cold=1 native_direct_warm=0 \
        mem_total_kib="$(awk '$1 == "MemTotal:" {print $2}' /proc/meminfo)" clk_tck="$CLK_TCK" \
        asiffs_rev="$(jstr "$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)$(cd "$ROOT" && git diff --quiet 2>/dev/null || echo -dirty)")" \
        fio="$(jstr "$(fio --version)")" qemu="$(jstr "$(qemu-img --version | head -1)")" \
        kernel="$(jstr "$(uname -r)")" nproc="$(nproc)" fs="$(jstr "$(stat -f -c %T "$WORK")")"

    avail_gb=$(( $(stat -f -c '%a * %S' "$WORK") / 1000000000 ))
    log "work dir $WORK ($avail_gb GB free), results $RESULTS, raw $RAW"
    (( avail_gb > MIN_FREE_GB + $(wc -w <<<"$TARGETS") * $(to_bytes "$SIZE") / 1000000000 )) || die "not enough free space in $WORK"

    log "config: size=$SIZE runs=$RUNS runtime=${RUNTIME}s ramp=${RAMP}s targets='$TARGETS' modes='$RUN_MODES' asiffs_ok=$ASIFFS_OK asiffs cold cache: $(asiffs_cache_label cold); asiffs $(uring_label asiffs), classic $(uring_label classic), $URING_KNOB=$(cat "$URING_KNOB" 2>/dev/null || echo absent)"
    t_start=$(date +%s)
    run_main
    for x in $EXTRAS; do
        case $x in
        mount)   log "extra: mount $MANY images"; run_mount_many ;;
        open)    log "extra: open $BIG image";    run_open_big ;;
        convert) log "extra: convert $CONV";      run_convert ;;
        *) warn "unknown extra $x" ;;
        esac
    done
    record kind='"elapsed"' s="$(( $(date +%s) - t_start ))"

    python3 "$BENCH_DIR/report.py" "$MEAS" "$RESULTS/$STAMP.json" "$RESULTS/latest.md"
    cp "$RESULTS/$STAMP.json" "$RESULTS/latest.json"
    log "results: $RESULTS/$STAMP.json (also latest.json, latest.md); raw fio output in $RAW"
}

main "$@"
exit $?
