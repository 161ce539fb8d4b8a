"""The NT hash of a password (MD4 of its UTF-16LE encoding): what Samba's password database
stores and what an SMB client proves it knows.

OpenSSL 3 (and so Python's :mod:`hashlib` here) no longer offers MD4 without its legacy
provider, so MD4 (RFC 1320) is written out below: a few lines, checked against the RFC's test
vectors in the unit tests. It is used for nothing else.

The NT hash is unsalted and, for SMB, equivalent to the password itself: it is computed on the
deploying machine at deploy time and only ever written to root-only files on the server.
"""

from __future__ import annotations

import struct

_MASK = 0xFFFFFFFF


def _rotl(x: int, n: int) -> int:
    x &= _MASK
    return ((x << n) | (x >> (32 - n))) & _MASK


def md4(data: bytes) -> bytes:
    """MD4 (RFC 1320) of ``data``."""
    msg = data + b"\x80" + b"\x00" * ((55 - len(data)) % 64) + struct.pack("<Q", len(data) * 8)
    a, b, c, d = 0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476
    for off in range(0, len(msg), 64):
        x = struct.unpack("<16I", msg[off:off + 64])
        aa, bb, cc, dd = a, b, c, d
        for i in range(16):  # round 1: F(x, y, z) = xy v not(x) z
            k, s = i, (3, 7, 11, 19)[i % 4]
            f = (b & c) | (~b & d)
            a, b, c, d = d, _rotl(a + f + x[k], s), b, c
        for i in range(16):  # round 2: G(x, y, z) = xy v xz v yz, + 5A827999
            k, s = (i % 4) * 4 + i // 4, (3, 5, 9, 13)[i % 4]
            g = (b & c) | (b & d) | (c & d)
            a, b, c, d = d, _rotl(a + g + x[k] + 0x5A827999, s), b, c
        for i in range(16):  # round 3: H(x, y, z) = x xor y xor z, + 6ED9EBA1
            k = (0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15)[i]
            s = (3, 9, 11, 15)[i % 4]
            a, b, c, d = d, _rotl(a + (b ^ c ^ d) + x[k] + 0x6ED9EBA1, s), b, c
        a, b, c, d = (a + aa) & _MASK, (b + bb) & _MASK, (c + cc) & _MASK, (d + dd) & _MASK
    return struct.pack("<4I", a, b, c, d)


def nt_hash(password: str) -> str:
    """The NT hash of ``password``, as 32 upper-case hex digits (the smbpasswd file's form)."""
    return md4(password.encode("utf-16-le")).hex().upper()
