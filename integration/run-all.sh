#!/usr/bin/env bash
# Run every integration/*.sh (except run-all.sh and lib.sh), sorted, each
# under a timeout; print "N passed, N failed" and exit non-zero on a failure.
#
#   integration/run-all.sh [NAME...]   run only the named scripts (e.g. interop_dissect)
#
# Environment: INTEGRATION_TIMEOUT (seconds per script, default 900),
# ASIFFS / VECTORS / PYTHON override the defaults below.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO_ROOT="$(pwd)"

export ASIFFS="${ASIFFS:-$REPO_ROOT/target/release/asiffs}"
if [[ -z "${VECTORS:-}" ]]; then
    VECTORS="$(cd "$REPO_ROOT/../shared/vectors" 2>/dev/null && pwd)" || VECTORS="$REPO_ROOT/../shared/vectors"
fi
export VECTORS
export PYTHON="${PYTHON:-$REPO_ROOT/.venv/bin/python}"
TIMEOUT="${INTEGRATION_TIMEOUT:-900}"

export ASIFFS_TEST_ROOT
ASIFFS_TEST_ROOT="$(mktemp -d "${TMPDIR:-/tmp}/asiffs-integration.XXXXXX")"
LOGDIR="$REPO_ROOT/target/integration-logs"
mkdir -p "$LOGDIR"

# Unmount anything a (killed) script left mounted below the test root.
cleanup_mounts() {
    local m
    awk -v d="$ASIFFS_TEST_ROOT" 'index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r |
        while read -r m; do
            fusermount3 -u "$m" 2>/dev/null || umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
        done
}
trap 'cleanup_mounts; rm -rf "$ASIFFS_TEST_ROOT" 2>/dev/null || true' EXIT

scripts=()
if [[ $# -gt 0 ]]; then
    for name in "$@"; do
        name="${name%.sh}"
        name="${name#integration/}"
        [[ -f "integration/$name.sh" ]] || { echo "no such script: integration/$name.sh" >&2; exit 2; }
        scripts+=("integration/$name.sh")
    done
else
    while IFS= read -r f; do
        case "$(basename "$f")" in
            run-all.sh | lib.sh) continue ;;
        esac
        scripts+=("$f")
    done < <(find integration -maxdepth 1 -name '*.sh' -type f | LC_ALL=C sort)
fi

echo "integration: ASIFFS=$ASIFFS"
echo "integration: VECTORS=$VECTORS"
echo "integration: PYTHON=$PYTHON"
echo "integration: ${#scripts[@]} scripts, timeout ${TIMEOUT}s each, logs in $LOGDIR"
echo "integration: FUSE over io_uring: $(cat /sys/module/fuse/parameters/enable_uring 2>/dev/null || echo absent)"

# Every mount script runs twice: as users get it (-o uring=auto: FUSE over
# io_uring when the kernel offers it) and on the fuser transport
# (uring=off), through a wrapper that adds the option to `asiffs mount`.
REAL_ASIFFS="$ASIFFS"
runs=()
for s in "${scripts[@]}"; do
    runs+=("$s:")
    case "$(basename "$s")" in
        # mount(8) runs the installed helper, not $ASIFFS; mount_uring
        # chooses its transports itself.
        mount_fstab.sh | mount_uring.sh) ;;
        mount_*) runs+=("$s:off") ;;
    esac
done
WRAPDIR="$ASIFFS_TEST_ROOT/uring-off"
mkdir -p "$WRAPDIR"
cat >"$WRAPDIR/asiffs" <<WRAP
#!/usr/bin/env bash
if [[ "\${1:-}" == mount ]]; then
    shift
    exec "$REAL_ASIFFS" mount -o uring=off "\$@"
fi
exec "$REAL_ASIFFS" "\$@"
WRAP
chmod +x "$WRAPDIR/asiffs"

passed=0
failed=0
failed_names=()
for run in "${runs[@]}"; do
    s="${run%%:*}"
    mode="${run#*:}"
    name="$(basename "$s" .sh)"
    export ASIFFS="$REAL_ASIFFS"
    if [[ -n "$mode" ]]; then
        ASIFFS="$WRAPDIR/asiffs"
        name="$name[uring=$mode]"
    fi
    logf="$LOGDIR/$name.log"
    start=$SECONDS
    rc=0
    timeout --kill-after=15 "$TIMEOUT" bash "$s" </dev/null >"$logf" 2>&1 || rc=$?
    cleanup_mounts
    took=$((SECONDS - start))
    if [[ $rc -eq 0 ]]; then
        passed=$((passed + 1))
        echo "PASS $name (${took}s)"
    else
        failed=$((failed + 1))
        failed_names+=("$name")
        if [[ $rc -eq 124 || $rc -eq 137 ]]; then
            echo "FAIL $name (timed out after ${TIMEOUT}s)"
        else
            echo "FAIL $name (exit $rc, ${took}s); last lines of $logf:"
        fi
        tail -n 60 "$logf" | sed 's/^/    /'
    fi
done

if [[ $failed -gt 0 ]]; then
    echo "failed: ${failed_names[*]}"
fi
echo "$passed passed, $failed failed"
[[ $failed -eq 0 && $passed -gt 0 ]]
