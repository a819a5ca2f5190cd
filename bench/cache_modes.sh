#!/usr/bin/env bash
# Side by side, cold (host cache dropped before each job), three
# alternating rounds: a raw file with O_DIRECT against asiffs mounts with
# cache=none and cache=writeback over io_uring, and cache=none with the
# blocking fallback. 4 KiB random reads at QD32 and QD1, 1 MiB sequential
# reads at QD16. Needs root. SIZE (default 2G) and RT (seconds, default 8).
# The figures behind the mount's default cache mode in the README.
set -euo pipefail
PARSE='import json, sys
j = json.load(sys.stdin)["jobs"][0]["read"]
p99 = j["clat_ns"]["percentile"]["99.000000"] / 1000
print("%.0f IOPS %.0f MiB/s p99 %.0fus" % (j["iops"], j["bw"] / 1024, p99))'
A=${ASIFFS:-$(dirname "$0")/../target/release/asiffs}
W=${BENCH_WORK:-$(dirname "$0")/work/cache-modes}; mkdir -p $W/src $W/mnt
SIZE=${SIZE:-2G}; RT=${RT:-8}
trap 'umount "$W/mnt" 2>/dev/null || true' EXIT
umount $W/mnt 2>/dev/null || true
if [[ ! -f $W/src/d.asif ]]; then
  $A create $W/src/d.asif --size $SIZE >/dev/null
  $A mount $W/src $W/mnt
  fio --name=fill --filename=$W/mnt/d.img --rw=write --bs=1M --direct=1 --size=$SIZE --ioengine=libaio --iodepth=8 >/dev/null
  $A umount $W/mnt
  fallocate -l $SIZE $W/native.raw; dd if=/dev/urandom of=$W/native.raw bs=1M count=$(( ${SIZE%G} * 1024 )) oflag=direct conv=notrunc status=none
fi
job() { # file rw bs qd
  sync; echo 3 > /proc/sys/vm/drop_caches
  fio --name=j --filename=$1 --rw=$2 --bs=$3 --iodepth=$4 --direct=1 --ioengine=libaio --time_based --runtime=$RT --size=$SIZE --randrepeat=0 --output-format=json 2>/dev/null |
    python3 -c "$PARSE"
}
for r in 1 2 3; do
  for cfg in native none:uring writeback:uring none:threads; do
    if [[ $cfg == native ]]; then f=$W/native.raw; else
      $A mount $W/src $W/mnt -o ro,cache=${cfg%:*} --aio ${cfg#*:}; f=$W/mnt/d.img; fi
    echo "r$r $cfg randread4k-qd32: $(job $f randread 4k 32)"
    echo "r$r $cfg seqread1M-qd16: $(job $f read 1M 16)"
    echo "r$r $cfg randread4k-qd1: $(job $f randread 4k 1)"
    [[ $cfg == native ]] || $A umount $W/mnt
  done
done
