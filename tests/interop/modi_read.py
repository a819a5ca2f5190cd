#!/usr/bin/env python3
"""Writes the virtual disk of an Apple disk image, as libyal's libmodi
(pymodi) reads it, to a raw file: an independent reader for the UDIF tests.

    modi_read.py IMAGE OUT.raw      prints the media size
"""
import sys

import pymodi

CHUNK = 1 << 20


def main() -> int:
    image, out = sys.argv[1], sys.argv[2]
    h = pymodi.handle()
    h.open(image)
    try:
        size = h.get_media_size()
        h.seek_offset(0, 0)
        with open(out, "wb") as f:
            done = 0
            while done < size:
                b = h.read_buffer(min(CHUNK, size - done))
                if not b:
                    raise SystemExit(f"{image}: pymodi read stopped at {done} of {size} bytes")
                f.write(b)
                done += len(b)
    finally:
        h.close()
    print(size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
