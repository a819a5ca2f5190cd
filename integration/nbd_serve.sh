#!/usr/bin/env bash
# `asiffs serve` with real NBD clients: qemu-img info/map/compare/convert,
# qemu-io, nbdinfo and nbdcopy over nbd+unix:// and nbd://127.0.0.1, then
# TLS through QEMU's tls-creds-x509 (and libnbd's nbds://), read-only
# exports, the image locks shared with `mount`, and the refusals.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
require_asiffs
for t in qemu-img qemu-io nbdinfo nbdcopy openssl; do
    command -v "$t" >/dev/null || fail "$t missing (make apt-deps: qemu-utils libnbd-bin openssl)"
done

MIB=$((1 << 20))
cd "$TESTDIR"
mkdir -p src

# Servers started here are stopped (SIGTERM: flush, exit) when the script ends.
PIDFILES=()
stop_servers() {
    local p pid i
    for p in "${PIDFILES[@]}"; do
        pid="$(cat "$p" 2>/dev/null)" || continue
        kill -TERM "$pid" 2>/dev/null || continue
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    done
}
trap 'rc=$?; stop_servers; (exit $rc); _lib_cleanup' EXIT

# stop PIDFILE: SIGTERM the server and wait (bounded) until it has exited.
stop() {
    local pid i
    pid="$(cat "$1")"
    kill -TERM "$pid"
    for ((i = 0; i < 300; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    fail "server $pid did not exit within 30 s of SIGTERM"
}

# port_of OUTFILE: the TCP port in the server's "serving ... on HOST:PORT" line.
port_of() {
    sed -n 's/^serving .* on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$1"
}

# data_ranges URI [qemu-img options...]: "START+LENGTH" of every data
# extent qemu-img map reports (base:allocation through NBD_CMD_BLOCK_STATUS).
data_ranges() {
    qemu-img map --output=json "$@" | python3 -c '
import json, sys
print(" ".join("%d+%d" % (e["start"], e["length"]) for e in json.load(sys.stdin) if e["data"]))'
}

gzip -dc "$VECTORS/apple-basic.asif.gz" >src/basic.asif
"$ASIFFS" create src/q.asif --size 256M >/dev/null
echo "not an image" >src/notes.txt
# ASIF magic, then garbage: probed as ASIF, fails to open, skipped.
printf 'shdw%0508d' 0 >src/broken.asif
"$ASIFFS" convert src/basic.asif basic.raw >/dev/null

# --- Unix socket, daemonized ----------------------------------------------
SOCK="$TESTDIR/nbd.sock"
PIDFILES+=("$TESTDIR/unix.pid")
"$ASIFFS" serve src --socket "$SOCK" --pid-file unix.pid --log unix.log >unix.out 2>unix.err
assert_eq "serving basic, q on $SOCK" "$(cat unix.out)" "daemon's ready line"
kill -0 "$(cat unix.pid)" || fail "daemon not running after serve returned"
# Startup warnings go to the terminal, before the daemon detaches.
grep -q 'broken.asif: skipped: unsupported ASIF version' unix.err || fail "no reason logged for skipping broken.asif: $(cat unix.err)"
U="nbd+unix:///q?socket=$SOCK"

nbdinfo --list "nbd+unix:///?socket=$SOCK" >list.txt
assert_eq 'export="basic" export="q"' "$(grep -o '^export="[^"]*"' list.txt | tr '\n' ' ' | sed 's/ $//')" "nbdinfo --list exports"
grep -q 'can_multi_conn: true' list.txt || fail "MULTI_CONN not advertised"
grep -q 'base:allocation' list.txt || fail "base:allocation not listed"
echo "PASS nbdinfo --list: basic and q, not notes.txt or broken.asif"

qemu-img info "$U" >info.txt
grep -q 'virtual size: 256 MiB (268435456 bytes)' info.txt || fail "qemu-img info: $(cat info.txt)"
echo "PASS qemu-img info over nbd+unix://"

qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' \
    -c 'write -P 0xcd 100M 3M' -c 'write -P 0xee 50M 2M' -c 'write -z -u 50M 2M' \
    -c 'write -z 60M 1M' -c 'read -P 0 50M 11M' "$U" >io.log
grep -qi 'fail\|error\|mismatch' io.log && fail "qemu-io: $(cat io.log)"
# write -z -u may leave a hole; plain write -z sends NO_HOLE, which must not.
assert_eq "0+$MIB $((60 * MIB))+$MIB $((100 * MIB))+$((3 * MIB))" "$(data_ranges -f raw "$U")" "qemu-img map after writes"
echo "PASS qemu-io write/read -P and write -z (NO_HOLE honoured); qemu-img map shows exactly the allocated chunks"

# A raw twin of what the export should now hold.
truncate -s 256M twin.raw
qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'write -P 0xcd 100M 3M' twin.raw >/dev/null
qemu-img compare -f raw -F raw "$U" twin.raw || fail "qemu-img compare export vs twin"
qemu-img compare -f raw -F raw "nbd+unix:///basic?socket=$SOCK" basic.raw || fail "basic export vs asiffs convert"
echo "PASS qemu-img compare: q against its raw twin, basic against asiffs convert"

nbdcopy "$U" copy.raw
cmp copy.raw twin.raw || fail "nbdcopy output differs"
used=$(($(stat -c %b copy.raw) * 512))
[[ $used -le $((16 * MIB)) ]] || fail "nbdcopy wrote $used bytes for 4 MiB of data: holes not skipped"
qemu-img convert -f raw -O raw "$U" conv.raw
cmp conv.raw twin.raw || fail "qemu-img convert output differs"
echo "PASS nbdcopy ($used bytes allocated for 256 MiB) and qemu-img convert reproduce the export"

# Discard a whole chunk through qemu-io: it reads as zeros and is a hole again.
qemu-io -f raw -c 'discard 100M 1M' -c 'read -P 0 100M 1M' "$U" >io.log
grep -qi 'fail\|error\|mismatch' io.log && fail "qemu-io discard: $(cat io.log)"
assert_eq "0+$MIB $((60 * MIB))+$MIB $((101 * MIB))+$((2 * MIB))" "$(data_ranges -f raw "$U")" "map after discard"
qemu-io -f raw -c 'write -z 100M 1M' twin.raw >/dev/null
echo "PASS discard via qemu-io frees the chunk"

# The mount's locks: a writable server holds the images exclusively.
rc=0
"$ASIFFS" serve src --socket "$TESTDIR/second.sock" -f >second.out 2>&1 || rc=$?
[[ $rc -ne 0 ]] || fail "a second writable server started on locked images"
grep -q 'in use by another process' second.out || fail "second server: $(cat second.out)"
mkdir -p mnt
assert_cmd_fails "$ASIFFS" mount src/q.asif mnt
grep -q 'in use by another process' "$TESTDIR/.last_out" || fail "mount refusal: $(cat "$TESTDIR/.last_out")"
echo "PASS images served for writing are locked against a second server and a mount"

# SIGTERM flushes; the image is clean and holds what was written.
stop unix.pid
[[ ! -e "$SOCK" && ! -e unix.pid ]] || fail "socket or pid file left behind"
assert_check_clean src/q.asif "after SIGTERM"
"$ASIFFS" convert src/q.asif after.raw >/dev/null
cmp after.raw twin.raw || fail "image content after SIGTERM differs from the twin"
echo "PASS SIGTERM flushes and exits; check clean, content intact"

# --- TCP on loopback, foreground ------------------------------------------
PIDFILES+=("$TESTDIR/tcp.pid")
"$ASIFFS" serve src --listen 127.0.0.1:0 -f --pid-file tcp.pid >tcp.out 2>tcp.err &
for ((i = 0; i < 100; i++)); do
    [[ -n "$(port_of tcp.out)" ]] && break
    sleep 0.1
done
PORT="$(port_of tcp.out)"
[[ -n "$PORT" ]] || fail "TCP server did not report its port: $(cat tcp.out tcp.err)"
T="nbd://127.0.0.1:$PORT/q"
qemu-img info "$T" | grep -q 'virtual size: 256 MiB' || fail "qemu-img info over nbd://"
qemu-io -f raw -c 'write -P 0x5a 200M 1M' -c 'read -P 0x5a 200M 1M' "$T" >io.log
grep -qi 'fail\|error\|mismatch' io.log && fail "qemu-io over TCP: $(cat io.log)"
qemu-io -f raw -c 'write -P 0x5a 200M 1M' twin.raw >/dev/null
qemu-img compare -f raw -F raw "$T" twin.raw || fail "compare over TCP"
assert_eq "0+$MIB $((60 * MIB))+$MIB $((101 * MIB))+$((2 * MIB)) $((200 * MIB))+$MIB" "$(data_ranges -f raw "$T")" "map over TCP"
nbdinfo --list "nbd://127.0.0.1:$PORT" | grep -q '^export="q"' || fail "nbdinfo --list over TCP"
rm -f copy.raw
nbdcopy "$T" copy.raw
cmp copy.raw twin.raw || fail "nbdcopy over TCP differs"
echo "PASS qemu-img info/compare/map, qemu-io, nbdinfo, nbdcopy over nbd://127.0.0.1"

# nbdcopy into the export: several connections at once (MULTI_CONN), zeroes
# for the holes, one flush at the end.
truncate -s 256M rnd.raw
for off in 3 77 150 255; do
    head -c $((MIB + 12345)) /dev/urandom | dd of=rnd.raw bs=1M seek=$off conv=notrunc status=none
done
truncate -s 256M rnd.raw
nbdcopy --connections=4 rnd.raw "$T"
qemu-img compare -f raw -F raw "$T" rnd.raw || fail "export after nbdcopy into it"
cp --sparse=always rnd.raw twin.raw
stop tcp.pid
wait || true
assert_check_clean src/q.asif "after nbdcopy into the export"
"$ASIFFS" convert src/q.asif after.raw --force >/dev/null
cmp after.raw rnd.raw || fail "image after nbdcopy differs from its source"
echo "PASS nbdcopy --connections=4 into the export; flushed, clean, identical"

# Non-loopback without TLS needs --insecure.
assert_exit 1 "$ASIFFS" serve src --listen 0.0.0.0:0 -f
grep -q 'not a loopback address' "$TESTDIR/.last_out" || fail "refusal message: $(cat "$TESTDIR/.last_out")"
echo "PASS non-loopback listen without TLS refused"

# --- Read-only: shared locks, two servers at once, writes refused ---------
PIDFILES+=("$TESTDIR/ro1.pid" "$TESTDIR/ro2.pid")
"$ASIFFS" serve src -r --export q --socket "$TESTDIR/ro1.sock" --pid-file ro1.pid >/dev/null
"$ASIFFS" serve src -r --export q.asif --socket "$TESTDIR/ro2.sock" --pid-file ro2.pid >/dev/null
R="nbd+unix:///q?socket=$TESTDIR/ro1.sock"
nbdinfo "$R" | grep -q 'is_read_only: true' || fail "read-only export not flagged"
nbdinfo --list "nbd+unix:///?socket=$TESTDIR/ro2.sock" | grep -c '^export=' | grep -qx 1 || fail "--export did not limit to one"
assert_cmd_fails qemu-io -f raw -c 'write -P 1 0 4k' "$R"
qemu-img compare -f raw -F raw "nbd+unix:///q?socket=$TESTDIR/ro2.sock" twin.raw || fail "read-only export content"
stop ro1.pid
stop ro2.pid
echo "PASS -r: two read-only servers share the image, writes refused, --export limits"

# --- TLS -------------------------------------------------------------------
mkdir -p pki/client pki/nocert
(
    cd pki
    ext() { printf '%s\n' "$@" >"$TESTDIR/pki/ext.cnf"; }
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca-key.pem \
        -out ca-cert.pem -days 2 -subj "/CN=asiffs test CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout server-key.pem \
        -out server.csr -subj "/CN=localhost" 2>/dev/null
    # GnuTLS (QEMU) insists on keyEncipherment in the key usage.
    ext "subjectAltName=DNS:localhost,IP:127.0.0.1" "extendedKeyUsage=serverAuth" \
        "keyUsage=critical,digitalSignature,keyEncipherment" "basicConstraints=CA:FALSE"
    openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -set_serial 2 \
        -out server-cert.pem -days 2 -extfile ext.cnf 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout client/client-key.pem \
        -out client.csr -subj "/CN=client" 2>/dev/null
    ext "extendedKeyUsage=clientAuth" "keyUsage=critical,digitalSignature,keyEncipherment" "basicConstraints=CA:FALSE"
    openssl x509 -req -in client.csr -CA ca-cert.pem -CAkey ca-key.pem -set_serial 3 \
        -out client/client-cert.pem -days 2 -extfile ext.cnf 2>/dev/null
    cp ca-cert.pem client/
    cp ca-cert.pem nocert/
)
PIDFILES+=("$TESTDIR/tls.pid")
"$ASIFFS" serve src --listen 127.0.0.1:0 --pid-file tls.pid --log tls.log \
    --tls-cert pki/server-cert.pem --tls-key pki/server-key.pem --tls-ca pki/ca-cert.pem >tls.out
PORT="$(port_of tls.out)"
[[ -n "$PORT" ]] || fail "TLS server did not report its port: $(cat tls.out)"
OBJ="tls-creds-x509,id=tls0,dir=$TESTDIR/pki/client,endpoint=client"
OPTS="driver=nbd,host=127.0.0.1,port=$PORT,export=q,tls-creds=tls0"
qemu-img info --object "$OBJ" --image-opts "$OPTS" | grep -q 'virtual size: 256 MiB' || fail "qemu-img info over TLS"
qemu-io --object "$OBJ" --image-opts "$OPTS" -c 'write -P 0x3c 10M 64k' -c 'read -P 0x3c 10M 64k' >io.log
grep -qi 'fail\|error\|mismatch' io.log && fail "qemu-io over TLS: $(cat io.log)"
qemu-io -f raw -c 'write -P 0x3c 10M 64k' twin.raw >/dev/null
qemu-img compare --object "$OBJ" --image-opts "$OPTS" "driver=file,filename=$TESTDIR/twin.raw" \
    || fail "qemu-img compare over TLS"
nbdinfo --list "nbds://127.0.0.1:$PORT/?tls-certificates=$TESTDIR/pki/client" | grep -q '^export="q"' \
    || fail "nbdinfo over TLS"
echo "PASS qemu-img info/compare and qemu-io over TLS (tls-creds-x509), nbdinfo nbds://"

# Without TLS, or without a client certificate: refused.
assert_cmd_fails qemu-img info "nbd://127.0.0.1:$PORT/q"
grep -q 'TLS' "$TESTDIR/.last_out" || fail "plain client refusal: $(cat "$TESTDIR/.last_out")"
assert_cmd_fails qemu-img info --object "tls-creds-x509,id=tls0,dir=$TESTDIR/pki/nocert,endpoint=client" \
    --image-opts "$OPTS"
kill -0 "$(cat tls.pid)" || fail "TLS server died after refused clients"
qemu-img info --object "$OBJ" --image-opts "$OPTS" >/dev/null || fail "TLS server stopped serving"
stop tls.pid
assert_check_clean src/q.asif "after the TLS server"
echo "PASS plain and certificate-less clients refused; the server goes on"
