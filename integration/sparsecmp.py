#!/usr/bin/env python3
"""Compare files that may be huge and sparse, reading only their data extents.

    sparsecmp.py A B          exit 0 if A and B have the same size and bytes
    sparsecmp.py --zero A N   exit 0 if A is N bytes long and reads as all zeros

Holes read as zeros, so only the union of the data extents (SEEK_DATA /
SEEK_HOLE) of the files has to be read. Exit 1 on a difference (the first
differing offset is printed), 2 on usage or I/O errors.
"""

from __future__ import annotations

import os
import sys

BUF = 1 << 20


def data_extents(fd: int, size: int):
    """Yield (start, end) of the data extents of fd (the whole file if the
    filesystem does not support SEEK_DATA)."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:  # ENXIO: no more data
            if e.errno == 6:
                return
            yield pos, size
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, min(end, size)
        pos = end


def merge(extents):
    out = []
    for s, e in sorted(extents):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def read_at(fd: int | None, off: int, n: int) -> bytes:
    if fd is None:
        return bytes(n)
    buf = os.pread(fd, n, off)
    if len(buf) < n:
        buf += bytes(n - len(buf))
    return buf


def compare(fa: int, fb: int | None, size: int, name_a: str, name_b: str) -> int:
    ext = list(data_extents(fa, size))
    if fb is not None:
        ext += list(data_extents(fb, size))
    for s, e in merge(ext):
        off = s
        while off < e:
            n = min(BUF, e - off)
            a = read_at(fa, off, n)
            b = read_at(fb, off, n)
            if a != b:
                i = next(i for i in range(n) if a[i] != b[i])
                print(f"sparsecmp: {name_a} and {name_b} differ at byte {off + i}", file=sys.stderr)
                return 1
            off += n
    return 0


def main(argv: list[str]) -> int:
    try:
        if len(argv) == 4 and argv[1] == "--zero":
            path, size = argv[2], int(argv[3])
            actual = os.stat(path).st_size
            if actual != size:
                print(f"sparsecmp: {path} is {actual} bytes, expected {size}", file=sys.stderr)
                return 1
            fd = os.open(path, os.O_RDONLY)
            return compare(fd, None, size, path, "zeros")
        if len(argv) == 3:
            a, b = argv[1], argv[2]
            sa, sb = os.stat(a).st_size, os.stat(b).st_size
            if sa != sb:
                print(f"sparsecmp: sizes differ: {a} is {sa} bytes, {b} is {sb}", file=sys.stderr)
                return 1
            return compare(os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY), sa, a, b)
    except OSError as e:
        print(f"sparsecmp: {e}", file=sys.stderr)
        return 2
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
