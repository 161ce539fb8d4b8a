"""What a module owns on its host: packages, directories, files, units, guarded commands.

These are the module's own resources, applied by the backend as plan steps. Everything a
module needs from *another* module is a request (:mod:`selfhost.compose.requests`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from selfhost.models.base import SecretRef

SECRET_MARK = "@@selfhost-secret-{}@@"
"""Placeholder, in a managed file's ``content``, for its ``secrets[N]`` (filled in by the
backend on the deploying machine; the plan and its fixtures only ever hold the marker)."""


@dataclass(frozen=True)
class SecretPiece:
    """A secret that goes into a file's content: as is, or hashed on the deploying machine.

    ``bcrypt`` hashes get a salt derived from the secret and ``context`` (HMAC), so the same
    password gives the same hash on every deploy (a re-deploy changes nothing) while two
    users or two hosts never share a hash. ``bcrypt-base64`` is the same hash, base64-encoded
    (what Caddy 2.6's ``basicauth`` reads). ``scram-sha-1`` gives SCRAM-SHA-1 keys (RFC 5802)
    as ``ITERATIONS<TAB>SALT<TAB>STORED_KEY<TAB>SERVER_KEY`` (keys in hex), the salt (32 hex
    characters) derived the same way: what an XMPP server stores instead of a password.
    ``nt-hash`` is the password's NT hash (MD4 of its UTF-16LE form, 32 upper-case hex
    digits: what Samba's password database holds). ``mysql-native`` is MariaDB's
    ``mysql_native_password`` hash (``*`` and the upper-case hex SHA-1 of the password's
    binary SHA-1)."""

    ref: SecretRef
    transform: Literal["plain", "bcrypt", "bcrypt-base64", "scram-sha-1", "nt-hash",
                       "mysql-native"] = "plain"
    context: str = ""


@dataclass(frozen=True)
class ManagedFile:
    """A file the deploy writes in full. ``validate`` is a shell command run on the staged file
    (``{path}`` is replaced by its path) before it replaces the live one."""

    path: str
    content: str
    mode: str = "0644"
    owner: str = "root"
    group: str = "root"
    validate: str | None = None
    secret: SecretRef | None = None
    """If set, ``content`` is ignored: the file holds this secret (resolved on the deploying
    machine at deploy time, never in the plan, never in logs). Mode must be 0600 or 0400."""
    secret_file: str | None = None
    """If set, ``content`` is ignored: the file holds the bytes of this file of the deploying
    machine (a private key of the controller's key store), uploaded as a secret."""
    host_key_of: tuple[str, str, int] | None = None
    """If set, ``content`` is ignored: a known_hosts line for (fleet host, address, port),
    with that host's Ed25519 host key read from it at deploy time."""
    secrets: tuple[SecretPiece, ...] = ()
    """Secrets (or their hashes) that replace the markers ``SECRET_MARK.format(N)`` in
    ``content`` at deploy time. A file with secrets must not be world-readable."""

    @property
    def opaque(self) -> bool:
        """Whether the plan does not hold the file's final content (a secret, a key of the
        controller, another host's key, hashes filled in at deploy time): checks compare its
        mode and owner only."""
        return bool(self.secret is not None or self.secret_file or self.secrets
                    or self.host_key_of)


@dataclass(frozen=True)
class ManagedDir:
    path: str
    mode: str = "0755"
    owner: str = "root"
    group: str = "root"


@dataclass(frozen=True)
class Unit:
    """A systemd unit that must be enabled and running.

    ``reload_on`` lists managed file paths: when any of them changes, the unit is reloaded
    (``reload=True``) or restarted."""

    name: str
    reload_on: tuple[str, ...] = ()
    reload: bool = True
    running: bool = True
    enabled: bool = True


@dataclass(frozen=True)
class Command:
    """A shell command kept idempotent by a guard.

    It runs when ``unless`` (a shell test) fails, or, if ``on_change`` lists managed file
    paths, only when one of those files changed in this deploy."""

    name: str
    command: str
    unless: str | None = None
    on_change: tuple[str, ...] = ()
    after_files: bool = False
    """Run after the managed files are written (always true when ``on_change`` is set)."""
    during_packages: str | None = None
    """A slow part of ``command`` (e.g. making an RSA key pair) started in the background while
    the packages phase installs packages, when the guard does not hold: it may use only the
    base system, must write only files of its own (``command`` then takes them, after checking
    them) and may fail or be cut at any point. Without packages to install it is not run."""
    with_packages: tuple[str, ...] = ()
    """Packages that ``command`` installs (e.g. one that conflicts with what the admin may
    have chosen, hence a guarded command): when the guard does not hold and the packages
    phase installs packages anyway, they are installed in that one apt run (a second run
    would pay for the hooks the first one installed: needrestart, apt-listchanges), and the
    guard, tested again before the command, then holds."""
    creates: tuple[str, ...] = ()
    """Files ``command`` writes on the host (not managed files: e.g. a configuration made
    there with a key that never passes through the plan). They are in the removal manifest
    with the module's managed files, so they go when the module, or its part, leaves the
    model."""

    @property
    def late(self) -> bool:
        return self.after_files or bool(self.on_change)
