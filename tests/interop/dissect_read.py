#!/usr/bin/env python3
"""Read an ASIF image with dissect.hypervisor (an independent reader) so tests
can compare its view of the virtual disk with asiffs's.

Usage:
    dissect_read.py IMAGE.asif OUT.raw   write the whole virtual disk to OUT.raw
                                         (sparse: all-zero blocks are skipped,
                                         then the file is truncated to size)
    dissect_read.py --sha256 IMAGE.asif  print the SHA-256 of the virtual disk
    dissect_read.py --info IMAGE.asif    print size, chunk size, active
                                         directory version as JSON

Notes on dissect.hypervisor's ASIF reader (checked against 3.21): it ignores
the entry state bits (a partially valid "11" chunk is read whole, the bitmap is
never consulted), ignores reserved entry bits, and validates nothing beyond the
header magic. So it is a fair oracle only for images whose partial chunks hold
zeros behind unwritten sectors (true for everything asiffs writes from scratch
and for the Apple vectors).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

from dissect.hypervisor.disk.asif import ASIF

BLOCK = 1 << 20  # read granularity: one 1 MiB chunk (dissect aligns to chunk size anyway)
ZERO = bytes(BLOCK)


def usage() -> int:
    print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
    return 64


def iter_disk(asif: ASIF):
    """Yield (offset, bytes_or_None) over the whole virtual disk, in order.

    None stands for a run of zeros that dissect was not asked to read: a
    directory entry of 0 means "no table, this whole range reads as zeros".
    dissect itself does not handle that case (it reads the table from chunk 0,
    i.e. the header, and returns garbage or crashes), so we skip those ranges
    here. Everything else is read through dissect's own stream.
    """
    stream = asif.open()
    directory = asif.active_directory
    span = asif._size_per_table  # virtual bytes covered by one table
    size = asif.size
    offset = 0
    while offset < size:
        t = offset // span
        if directory.entries[t] == 0:
            end = min(size, (t + 1) * span)
            yield offset, end - offset, None
            offset = end
            continue
        want = min(BLOCK, size - offset)
        stream.seek(offset)
        buf = stream.read(want)
        if len(buf) != want:
            raise IOError(f"short read at {offset}: got {len(buf)} of {want}")
        yield offset, want, buf
        offset += want


def write_raw(image: str, out: str) -> int:
    with open(image, "rb") as fh:
        asif = ASIF(fh)
        with open(out, "wb") as dst:
            dst.truncate(0)
            for offset, _, buf in iter_disk(asif):
                if buf is None or buf == ZERO[: len(buf)]:
                    continue
                dst.seek(offset)
                dst.write(buf)
            dst.truncate(asif.size)
    return 0


def sha256(image: str) -> int:
    h = hashlib.sha256()
    with open(image, "rb") as fh:
        asif = ASIF(fh)
        for _, length, buf in iter_disk(asif):
            if buf is None:
                while length:
                    n = min(length, BLOCK)
                    h.update(ZERO[:n])
                    length -= n
            else:
                h.update(buf)
    print(h.hexdigest())
    return 0


def info(image: str) -> int:
    with open(image, "rb") as fh:
        asif = ASIF(fh)
        print(
            json.dumps(
                {
                    "size": asif.size,
                    "max_size": asif.max_size,
                    "chunk_size": asif.chunk_size,
                    "block_size": asif.block_size,
                    "guid": str(asif.guid),
                    "active_directory_offset": asif.active_directory.offset,
                    "active_directory_version": asif.active_directory.version,
                    "directory_versions": [d.version for d in asif.directories],
                    "stable_uuid": asif.internal_metadata.get("stable uuid"),
                },
                sort_keys=True,
            )
        )
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[1] == "--sha256":
        return sha256(argv[2])
    if len(argv) == 3 and argv[1] == "--info":
        return info(argv[2])
    if len(argv) == 3 and not argv[1].startswith("-"):
        return write_raw(argv[1], argv[2])
    return usage()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
