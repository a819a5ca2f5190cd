# shellcheck shell=bash
# Shared helpers for integration/*.sh. Source it first thing:
#
#   #!/usr/bin/env bash
#   set -euo pipefail
#   . "$(dirname "$0")/lib.sh"
#
# Environment (exported by integration/run-all.sh; defaults let a script run
# on its own from the repo root):
#   ASIFFS   path of the asiffs binary          (target/release/asiffs)
#   VECTORS  directory with *.asif.gz vectors   (../shared/vectors)
#   PYTHON   venv python with dissect.hypervisor (.venv/bin/python)
#   ASIFFS_TEST_ROOT  parent for temp dirs, so run-all can clean up mounts
#
# After sourcing, $TESTDIR is a fresh temporary directory; it is removed on
# exit, after unmounting anything still mounted below it.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export REPO_ROOT
export ASIFFS="${ASIFFS:-$REPO_ROOT/target/release/asiffs}"
export VECTORS="${VECTORS:-$(cd "$REPO_ROOT/../shared/vectors" 2>/dev/null && pwd || echo "$REPO_ROOT/../shared/vectors")}"
export PYTHON="${PYTHON:-$REPO_ROOT/.venv/bin/python}"
export DISSECT_READ="$REPO_ROOT/tests/interop/dissect_read.py"
export SPARSECMP="$REPO_ROOT/integration/sparsecmp.py"

TEST_NAME="$(basename "$0" .sh)"
if [[ -n "${ASIFFS_TEST_ROOT:-}" ]]; then
    mkdir -p "$ASIFFS_TEST_ROOT"
    TESTDIR="$(mktemp -d "$ASIFFS_TEST_ROOT/$TEST_NAME.XXXXXX")"
else
    TESTDIR="$(mktemp -d "${TMPDIR:-/tmp}/asiffs-$TEST_NAME.XXXXXX")"
fi
export TESTDIR

log() { printf '[%s] %s\n' "$TEST_NAME" "$*"; }

fail() {
    printf '[%s] FAIL: %s\n' "$TEST_NAME" "$*" >&2
    exit 1
}

# mounts_below DIR: print the mount points at or below DIR, deepest first.
mounts_below() {
    local dir
    dir="$(realpath -m "$1")"
    awk -v d="$dir" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r
}

# unmount_quietly DIR: unmount DIR if it is mounted (FUSE first, then a plain
# and finally a lazy umount), and wait (bounded) until it no longer is. If an
# asiffs server served it, wait (30 s at most) for that server to flush and
# exit too, then SIGKILL it: no server outlives the test, holding files on a
# filesystem being unmounted next. Never fails.
unmount_quietly() {
    local dir="$1" i pid
    mountpoint -q "$dir" 2>/dev/null || return 0
    pid="$(python3 -c 'import os, sys; print(os.getxattr(sys.argv[1], "user.asiffs.pid").decode())' "$dir" 2>/dev/null)" || pid=""
    fusermount3 -u "$dir" >/dev/null 2>&1 \
        || umount "$dir" >/dev/null 2>&1 \
        || umount -l "$dir" >/dev/null 2>&1 \
        || true
    for ((i = 0; i < 100; i++)); do
        mountpoint -q "$dir" 2>/dev/null || break
        sleep 0.1
    done
    mountpoint -q "$dir" 2>/dev/null && log "warning: $dir still mounted after unmount attempts"
    if [[ "$pid" =~ ^[0-9]+$ ]]; then
        for ((i = 0; i < 300; i++)); do
            [[ -e /proc/$pid && "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]] || return 0
            sleep 0.1
        done
        log "warning: asiffs server $pid still running 30 s after unmounting $dir; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    return 0
}

# server_pid MOUNTPOINT: pid of the server, from the root's xattr.
server_pid() {
    python3 -c 'import os,sys; print(os.getxattr(sys.argv[1], "user.asiffs.pid").decode())' "$1"
}

# alive PID: the process exists and is not a zombie (exited, not yet reaped).
alive() {
    local st
    st="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    st="${st##*) }"
    [[ ${st:0:1} != Z ]]
}

# wait_for_mount DIR [TIMEOUT_SECONDS] [PID]: poll until DIR is a mount point.
# Fails after TIMEOUT_SECONDS (default 10), or at once if PID (the process
# that should be serving the mount) has exited.
wait_for_mount() {
    local dir="$1" timeout="${2:-10}" pid="${3:-}" i
    for ((i = 0; i < timeout * 20; i++)); do
        mountpoint -q "$dir" && return 0
        if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
            # It may have daemonized after mounting: look once more.
            mountpoint -q "$dir" && return 0
            fail "mount of $dir: process $pid exited before the mount appeared"
        fi
        sleep 0.05
    done
    fail "mount of $dir did not appear within ${timeout}s"
}

_lib_cleanup() {
    local rc=$? m
    if [[ -n "${TESTDIR:-}" && -d "$TESTDIR" ]]; then
        while read -r m; do
            [[ -n "$m" ]] && unmount_quietly "$m"
        done < <(mounts_below "$TESTDIR")
        if [[ -n "${KEEP_TESTDIR:-}" ]]; then
            log "keeping $TESTDIR"
        else
            rm -rf "$TESTDIR" 2>/dev/null || log "warning: could not remove $TESTDIR"
        fi
    fi
    exit "$rc"
}
trap _lib_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# assert_eq EXPECTED ACTUAL [MESSAGE]
assert_eq() {
    local expected="$1" actual="$2" msg="${3:-values differ}"
    [[ "$expected" == "$actual" ]] || fail "$msg: expected '$expected', got '$actual'"
}

# assert_ne UNEXPECTED ACTUAL [MESSAGE]
assert_ne() {
    local unexpected="$1" actual="$2" msg="${3:-values should differ}"
    [[ "$unexpected" != "$actual" ]] || fail "$msg: got '$actual'"
}

# assert_cmd_fails CMD [ARGS...]: the command must exit non-zero.
assert_cmd_fails() {
    local rc=0
    "$@" >"$TESTDIR/.last_out" 2>&1 || rc=$?
    if [[ $rc -eq 0 ]]; then
        cat "$TESTDIR/.last_out" >&2
        fail "command should have failed but exited 0: $*"
    fi
    return 0
}

# assert_exit CODE CMD [ARGS...]: the command must exit with exactly CODE.
assert_exit() {
    local want="$1" rc=0
    shift
    "$@" >"$TESTDIR/.last_out" 2>&1 || rc=$?
    if [[ $rc -ne $want ]]; then
        cat "$TESTDIR/.last_out" >&2
        fail "command exited $rc, expected $want: $*"
    fi
    return 0
}

# assert_same_content A B: files A and B have the same size and bytes (sparse
# aware, so it is fast on huge mostly-empty files).
assert_same_content() {
    python3 "$SPARSECMP" "$1" "$2" || fail "content differs: $1 vs $2"
}

# assert_all_zero FILE SIZE: FILE is SIZE bytes and reads as zeros.
assert_all_zero() {
    python3 "$SPARSECMP" --zero "$1" "$2" || fail "$1 is not $2 zero bytes"
}

# decompress_vectors DIR [GLOB]: gunzip $VECTORS/GLOB.asif.gz (default: all)
# into DIR as NAME.asif; prints nothing, fails if no vector matched.
decompress_vectors() {
    local dir="$1" glob="${2:-*}" f n=0
    [[ -d "$VECTORS" ]] || fail "vector directory $VECTORS not found"
    mkdir -p "$dir"
    for f in "$VECTORS"/$glob.asif.gz; do
        [[ -e "$f" ]] || continue
        gzip -dc "$f" >"$dir/$(basename "$f" .gz)" || fail "could not decompress $f"
        n=$((n + 1))
    done
    [[ $n -gt 0 ]] || fail "no vectors matching '$glob' in $VECTORS"
}

# require_asiffs: fail clearly if the binary is missing.
require_asiffs() {
    [[ -x "$ASIFFS" ]] || fail "asiffs binary not found at $ASIFFS (run make build)"
}

# require_python_dissect: fail clearly if the venv lacks dissect.hypervisor.
require_python_dissect() {
    "$PYTHON" -c 'import dissect.hypervisor.disk.asif' 2>/dev/null \
        || fail "$PYTHON cannot import dissect.hypervisor (run make deps)"
}

# image_check FILE: run `asiffs check FILE`, keeping its output in
# $TESTDIR/check.out; return its exit code (0 clean, 2 corrupt, 3 only
# leaked space). Afterwards check_why prints the one line of that output
# that names the problem (the first line when none does).
image_check() {
    local rc=0
    "$ASIFFS" check "$1" >"$TESTDIR/check.out" 2>&1 || rc=$?
    return $rc
}
check_why() {
    grep -m1 -iE 'leak|corrupt|error|invalid|bad|refus' "$TESTDIR/check.out" || head -n1 "$TESTDIR/check.out"
}

# assert_check_clean FILE WHAT: `asiffs check FILE` must exit 0; otherwise
# print its output and fail with one line: WHAT, the exit code and why.
assert_check_clean() {
    local rc=0
    image_check "$1" || rc=$?
    if [[ $rc -ne 0 ]]; then
        cat "$TESTDIR/check.out" >&2
        fail "$2: asiffs check exit $rc (2 = corrupt, 3 = leaked chunks): $(check_why)"
    fi
}
