#!/usr/bin/env python3
"""Decrypts an encrcdsa (version 2) encrypted disk image with the
`cryptography` package, written from the public description of Apple's
scheme rather than from asiffs: an independent reader for tests/crypt.rs.

    crypt_read.py IMAGE PASSWORD [OUT]   prints the plaintext's SHA-256
                                         and length; writes it to OUT
"""
import hashlib
import hmac
import struct
import sys

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

try:  # 3DES moved to "decrepit" in cryptography 43
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
except ImportError:  # pragma: no cover
    TripleDES = algorithms.TripleDES


def u32(b, at):
    return struct.unpack_from(">I", b, at)[0]


def u64(b, at):
    return struct.unpack_from(">Q", b, at)[0]


def cbc_decrypt(algo, iv, data):
    d = Cipher(algo, modes.CBC(iv)).decryptor()
    return d.update(data) + d.finalize()


def unlock(head, password):
    """(AES key, HMAC key, block size, data offset, data size)"""
    if head[:8] != b"encrcdsa" or u32(head, 8) != 2:
        raise SystemExit("not an encrcdsa version 2 image")
    key_bits, block_size = u32(head, 24), u32(head, 52)
    data_size, data_offset = u64(head, 56), u64(head, 64)
    for i in range(u32(head, 72)):
        kind, off = u32(head, 76 + 20 * i), u64(head, 80 + 20 * i)
        if kind == 1:
            break
    else:
        raise SystemExit("no password key blob")
    blob = head[off:]
    iterations, salt_len = u32(blob, 8), u32(blob, 12)
    salt = blob[16 : 16 + salt_len]
    iv = blob[52 : 52 + u32(blob, 48)]
    enc = blob[104 : 104 + u32(blob, 100)]
    kek = hashlib.pbkdf2_hmac("sha1", password, salt, iterations, 24)
    plain = cbc_decrypt(TripleDES(kek), iv, enc)
    pad = plain[-1]
    if not 1 <= pad <= 8 or plain[-pad:] != bytes([pad]) * pad:
        raise SystemExit("wrong password")
    klen = key_bits // 8
    return plain[:klen], plain[klen : klen + 20], block_size, data_offset, data_size


def main() -> int:
    image, password = sys.argv[1], sys.argv[2].encode()
    with open(image, "rb") as f:
        data = f.read()
    aes_key, hmac_key, bs, offset, size = unlock(data[: 64 << 10], password)
    out = bytearray()
    for n in range((size + bs - 1) // bs):
        block = data[offset + n * bs : offset + (n + 1) * bs]
        iv = hmac.new(hmac_key, struct.pack(">I", n), hashlib.sha1).digest()[:16]
        out += cbc_decrypt(algorithms.AES(aes_key), iv, block)
    del out[size:]
    if len(sys.argv) > 3:
        with open(sys.argv[3], "wb") as f:
            f.write(out)
    print(hashlib.sha256(out).hexdigest(), len(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
