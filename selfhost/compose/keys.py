"""The controller's key store: key pairs that must be known on two hosts at plan time.

A relation between two hosts of the fleet (a backup client and the friend's host keeping its
repository; the two ends of a WireGuard tunnel) needs a public key in one host's plan and the
private key on the other. The pair is generated on the deploying machine, the first time it is needed, in a
directory only its owner can read; the public key goes into plans, the private key is uploaded
as a secret at deploy time and never printed or logged.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Protocol


class KeyStore(Protocol):
    def public_key(self, path: str) -> str:
        """The public key line of the private key at ``path`` (created if missing)."""
        ...

    def wireguard_public_key(self, path: str) -> str:
        """The WireGuard (X25519) public key, base64, of the private key at ``path`` (created
        if missing)."""
        ...

    def salt_key(self) -> bytes:
        """A secret of the deploying machine that salts password hashes deterministically
        (so a re-deploy changes nothing) without the salt telling anything about the
        password."""
        ...


class DirKeyStore:
    """Ed25519 key pairs made with ``ssh-keygen`` (private key 0600, directory 0700), and the
    salt key in ``~/.config/selfhost/salt-key`` (0600)."""

    def __init__(self, salt_path: str = "~/.config/selfhost/salt-key") -> None:
        self.salt_path = Path(salt_path).expanduser()

    def public_key(self, path: str) -> str:
        return ensure_keypair(Path(path).expanduser())

    def wireguard_public_key(self, path: str) -> str:
        return ensure_wireguard_keypair(Path(path).expanduser())

    def salt_key(self) -> bytes:
        import os

        p = self.salt_path
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(os.urandom(32))
        return p.read_bytes()


class FakeKeyStore:
    """Deterministic stand-in public keys, for tests and ``selfhost plan`` (which must not
    create files): the same path always gives the same line."""

    def public_key(self, path: str) -> str:
        digest = hashlib.sha256(path.encode()).digest()
        import base64

        blob = b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + digest
        return f"ssh-ed25519 {base64.b64encode(blob).decode()} selfhost-plan-placeholder"

    def wireguard_public_key(self, path: str) -> str:
        import base64

        return base64.b64encode(hashlib.sha256(b"wireguard\0" + path.encode()).digest()).decode()

    def salt_key(self) -> bytes:
        return b"selfhost-fake-salt-key"


def ensure_keypair(path: Path) -> str:
    """Create an Ed25519 key pair at ``path`` if missing; return the public key line."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.parent.chmod(0o700)
    if not path.exists():
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
             f"selfhost-backup {path.name}", "-f", str(path)],
            check=True, stdin=subprocess.DEVNULL,
        )
    path.chmod(0o600)
    return path.with_name(path.name + ".pub").read_text().strip()


def ensure_wireguard_keypair(path: Path) -> str:
    """Create a WireGuard key pair at ``path`` if missing (the private key in base64, as
    ``wg genkey`` writes it, 0600; the public key in ``.pub`` next to it); return the public
    key. X25519 from ``cryptography`` (already a dependency of pyinfra's SSH client), so the
    deploying machine needs no WireGuard tools."""
    import base64
    import os

    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.parent.chmod(0o700)
    if not path.exists():
        key = X25519PrivateKey.generate()
        raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(base64.b64encode(raw).decode() + "\n")
    path.chmod(0o600)
    try:
        raw = base64.b64decode(path.read_text().strip(), validate=True)
        if len(raw) != 32:
            raise ValueError
    except ValueError:
        raise ValueError(f"{path}: not a WireGuard private key (32 bytes in base64)") from None
    public = base64.b64encode(X25519PrivateKey.from_private_bytes(raw).public_key()
                              .public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()
    pub = path.with_name(path.name + ".pub")
    if not pub.exists() or pub.read_text().strip() != public:
        pub.write_text(public + "\n")
    return public
