#!/usr/bin/env python3
"""Writes the seed corpus: small pieces of Apple's images and a few tiny
hand-made images. Run from the repository root; `make fuzz-seeds` does.

Seeds are named `seed-*` so that a rerun replaces them and leaves the
entries libFuzzer found (named by their hash) alone."""

import gzip
import struct
from pathlib import Path

VECTORS = Path("/work/shared/vectors")
CORPUS = Path("fuzz/corpus")


def vector(name, length):
    with gzip.open(VECTORS / name) as f:
        return f.read(length)


def seed(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / f"seed-{name}").write_bytes(data)


def u64(v):
    return struct.pack(">Q", v)


def header(cs, max_sectors, sectors, dir_a, dir_b, meta_chunk):
    h = bytearray(0x200)
    struct.pack_into(">4sII", h, 0, b"shdw", 1, 0x200)
    struct.pack_into(">QQ", h, 0x10, dir_a, dir_b)
    h[0x20:0x30] = bytes(range(1, 17))
    struct.pack_into(">QQIHHQ", h, 0x30, sectors, max_sectors, cs, 512, 0, meta_chunk)
    return h


def meta_chunk(uuid):
    plist = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<plist version="1.0"><dict>'
        "<key>internal metadata</key><dict><key>stable uuid</key>"
        f"<string>{uuid}</string></dict><key>user metadata</key><dict/>"
        "</dict></plist>\n"
    ).encode()
    m = bytearray(0x200)
    struct.pack_into(">4sIIQ", m, 0, b"meta", 1, 0x200, 0x200)
    return bytes(m) + plist + b"\0"


def small_image(cs, with_meta):
    """A disk of 16 chunks on one table: chunk 1 the table, 2 a full data
    chunk, 3 a partial one whose bitmap is chunk 4; with `with_meta`, the
    metadata chunk (the table's last) is chunk 5, partial too. These chunk
    sizes make one group per table, so one bitmap serves both.
    Trailing zeros are left out: the target pads to whole chunks."""
    n = 2048
    group = 8 * (n + 1)
    spc = cs // 512
    span = (cs // group) * n  # chunks one table covers
    img = bytearray(7 * cs)
    img[: 0x200] = header(cs, span * spc, 16 * spc, 0x200, 0x400, span - 1)
    img[0x200:0x210] = u64(2) + u64(1)  # directory A: version 2, table 0
    img[0x400:0x410] = u64(1) + u64(1)  # directory B: older, same table
    table = cs
    img[table : table + 8] = u64(0x4000_0000_0000_0002)  # full, chunk 2
    img[table + 8 : table + 16] = u64(0xC000_0000_0000_0003)  # partial, chunk 3
    img[table + 16 : table + 24] = u64(0x8000_0000_0000_0000)  # discarded
    img[table + 8 * n : table + 8 * n + 8] = u64(4)  # bitmap of group 0
    img[2 * cs : 3 * cs] = bytes(i % 251 for i in range(cs))
    img[3 * cs : 4 * cs] = b"\x77" * cs
    bits = 4 * cs + spc // 4  # entry 1's sectors: every other one written
    img[bits : bits + spc // 4] = b"\x11" * (spc // 4)
    if with_meta:
        assert span == n
        k = n - 1
        img[table + 8 * k : table + 8 * k + 8] = u64(0xC000_0000_0000_0005)
        m = meta_chunk("13db9632-b79f-4e95-aada-835d5ef97bba")
        img[5 * cs : 5 * cs + len(m)] = m
        for sector in (k * spc, k * spc + 1):  # header and plist written
            img[4 * cs + sector // 4] |= 1 << (2 * (sector % 4))
    return bytes(img).rstrip(b"\0")


def mish(first, count, data_start, runs):
    """A `mish` table; runs are (type, sector, sectors, offset, length)."""
    t = bytearray(0xCC)
    struct.pack_into(">4sIQQQII", t, 0, b"mish", 1, first, count, data_start, 8, 0)
    struct.pack_into(">I", t, 0xC8, len(runs))
    for r in runs:
        t += struct.pack(">IIQQQQ", r[0], 0, *r[1:])
    return bytes(t)


def udif_data_starts():
    """A small UDRW image in the older layout: a junk prefix, two tables
    listed out of disk order, each with its own data start (runs relative
    to it), a comment, a free and a zero run, end runs."""
    import base64

    raw, free, zero, comment, end = 1, 2, 0, 0x7FFFFFFE, 0xFFFFFFFF
    fork = b"\xa5" * 512 + bytes(range(256)) * 8 + b"\xa5" * 64 + b"\x5a" * 1024
    t0 = mish(0, 8, 512, [(comment, 0, 0, 0xFFFF0000, 16), (raw, 0, 4, 0, 2048),
                          (free, 4, 4, 2048, 0), (end, 8, 0, 0, 0)])
    t1 = mish(10, 4, 512 + 2048 + 64, [(raw, 0, 2, 0, 1024), (zero, 2, 2, 0, 0),
                                       (end, 4, 0, 0, 0)])
    entries = "".join(
        f"<dict><key>Attributes</key><string>0x0050</string><key>Data</key>"
        f"<data>{base64.b64encode(t).decode()}</data><key>ID</key><string>{i}</string>"
        f"<key>Name</key><string>part {i}</string></dict>"
        for i, t in ((1, t1), (0, t0))
    )
    plist = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<plist version="1.0"><dict>'
        f"<key>resource-fork</key><dict><key>blkx</key><array>{entries}</array>"
        "</dict></dict></plist>\n"
    ).encode()
    k = bytearray(512)
    struct.pack_into(">4sIII", k, 0, b"koly", 4, 512, 1)
    struct.pack_into(">QQ", k, 0x18, 0, len(fork))
    struct.pack_into(">QQ", k, 0xD8, len(fork), len(plist))
    struct.pack_into(">IQ", k, 0x1E8, 1, 14)
    return fork + plist + bytes(k)


def main():
    basic = vector("apple-basic.asif.gz", 5 << 20)
    blank = vector("apple-blank-10GB.asif.gz", 4 << 20)

    seed("header", "basic", basic[:0x200])
    seed("header", "blank", blank[:0x200])
    seed("header", "small", small_image(32768, False)[:0x200])

    dir_b = struct.unpack(">Q", basic[0x18:0x20])[0]
    seed("directory", "basic-a", b"\x00\x10" + basic[0x200 : 0x200 + 8 * 17])
    seed("directory", "basic-b", b"\x00\x10" + basic[dir_b : dir_b + 8 * 17])
    # The metadata table's entry is the directory's last.
    tail = 0x200 + 8 * 33289
    seed("directory", "blank-end", b"\x00\x04" + blank[0x200:0x208] + blank[tail - 24 : tail])

    table = basic[4 << 20 : (4 << 20) + 16392]
    seed("entries", "basic-group0", b"\x3f" + table[: 8 * 256])
    mgroup = blank[(1 << 20) + 7 * 16392 : (1 << 20) + 8 * 16392]
    seed("entries", "blank-meta-group", b"\x00" + mgroup)
    own = small_image(32768, False)
    seed("entries", "small-group0", b"\x3f" + own[32768 : 32768 + 16392] + b"\x11" * 64)

    seed("metadata", "basic", basic[2 << 20 : (2 << 20) + 0x400].rstrip(b"\0"))

    seed("image", "blank-header", blank[:0x200])
    seed("image", "small-32k", small_image(32768, True))
    seed("image", "small-16k", small_image(16896, True))

    for name in ("hfsplus_zlib", "hfsplus_bzip2"):
        seed("udif_parse", name, (VECTORS / "udif" / f"{name}.dmg").read_bytes())
    seed("udif_parse", "data-starts", udif_data_starts())

    enc = VECTORS / "real" / "encrypted"
    for bits in (128, 256):
        v2 = (enc / f"testimage.AES-{bits}.64k.header_v2.dmg").read_bytes()
        # The fields, the key-pointer table and the key blob (0x60+0x268).
        seed("crypt_header_v2", f"aes{bits}", v2[:0x2C8])
        seed("crypt_key_blob", f"aes{bits}", v2[0x60:0x2C8])
    v1 = (enc / "testimage.AES-256.64k.header_v1.dmg").read_bytes()
    seed("crypt_trailer_v1", "aes256", v1[-1276:])


if __name__ == "__main__":
    main()
