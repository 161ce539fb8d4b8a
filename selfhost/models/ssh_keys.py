"""Parsing and checking OpenSSH public keys."""

from __future__ import annotations

import base64
import binascii
import re
import struct

ALLOWED_TYPES = {
    "ssh-ed25519",
    "sk-ssh-ed25519@openssh.com",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ecdsa-sha2-nistp256@openssh.com",
}
MIN_RSA_BITS = 3072


def _read_string(blob: bytes, offset: int) -> tuple[bytes, int]:
    if offset + 4 > len(blob):
        raise ValueError("truncated key data")
    (length,) = struct.unpack(">I", blob[offset : offset + 4])
    end = offset + 4 + length
    if end > len(blob):
        raise ValueError("truncated key data")
    return blob[offset + 4 : end], end


def check_public_key(line: str) -> str:
    """Return the normalised key line, or raise ValueError saying what is wrong."""
    # sshd separates the fields of an authorized_keys line with spaces and tabs only.
    parts = re.split(r"[ \t]+", line.strip(), maxsplit=2)
    if len(parts) < 2:
        raise ValueError("an SSH public key looks like 'ssh-ed25519 AAAAC3... comment'")
    key_type, data = parts[0], parts[1]
    if key_type == "ssh-dss":
        raise ValueError("DSA keys are insecure and unsupported by OpenSSH; use ssh-ed25519")
    if key_type not in ALLOWED_TYPES:
        raise ValueError(f"unsupported key type {key_type!r}; use ssh-ed25519")
    try:
        blob = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the key data is not valid base64") from None
    inner, offset = _read_string(blob, 0)
    if inner.decode("ascii", "replace") != key_type:
        raise ValueError(f"the key data is a {inner.decode('ascii', 'replace')!r} key, "
                         f"not {key_type!r}")
    if key_type == "ssh-rsa":
        _e, offset = _read_string(blob, offset)
        n, offset = _read_string(blob, offset)
        bits = int.from_bytes(n, "big").bit_length()
        if bits < MIN_RSA_BITS:
            raise ValueError(f"RSA key of {bits} bits is too weak (at least {MIN_RSA_BITS}); "
                             "make a new one with `ssh-keygen -t ed25519`")
    elif key_type == "ssh-ed25519":
        pk, offset = _read_string(blob, offset)
        if len(pk) != 32:
            raise ValueError("malformed ed25519 key")
    return " ".join(parts)
