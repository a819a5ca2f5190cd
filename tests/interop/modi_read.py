#!/usr/bin/env python3
"""Reads a Mac OS disk image with libyal's libmodi (pymodi), an independent
reader, and writes the whole virtual disk to OUT (sparse: zero runs are
skipped), or prints {"size": N} with --info.

    modi_read.py IMAGE OUT
    modi_read.py --info IMAGE
"""

import json
import sys

import pymodi

STEP = 1 << 20


def main(argv):
    if len(argv) == 3 and argv[1] == "--info":
        h = pymodi.handle()
        h.open(argv[2])
        print(json.dumps({"size": h.get_media_size()}))
        return 0
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    h = pymodi.handle()
    h.open(argv[1])
    size = h.get_media_size()
    zero = bytes(STEP)
    with open(argv[2], "wb") as out:
        at = 0
        while at < size:
            n = min(STEP, size - at)
            data = h.read_buffer_at_offset(n, at)
            if len(data) != n:
                print(f"short read at {at}: {len(data)} of {n}", file=sys.stderr)
                return 1
            if data != zero[:n]:
                out.seek(at)
                out.write(data)
            at += n
        out.truncate(size)
    h.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
