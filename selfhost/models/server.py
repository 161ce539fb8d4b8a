"""The top-level model: one server."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from pydantic import Field, PrivateAttr, field_validator, model_validator
from pydantic_core import PydanticCustomError

from selfhost.hardening import Hardening
from selfhost.models.backup import BackupPolicy
from selfhost.models.base import Domain, Hostname, SecretRef, StrictModel
from selfhost.models.ssh_keys import check_public_key
from selfhost.services import Services

RESERVED_USERS = {
    "root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news", "uucp",
    "proxy", "www-data", "backup", "list", "irc", "gnats", "nobody", "sshd", "_apt",
    "messagebus", "caddy", "postfix", "dovecot", "admin", "ftp", "restic", "sudo", "adm",
    "staff", "users", "operator",
}
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_HASH_RE = re.compile(r"^\$(y|gy|7|2b|2y|6)\$[./A-Za-z0-9$=,]+$")


@functools.cache
def _timezones() -> frozenset[str]:
    from zoneinfo import available_timezones

    return frozenset(available_timezones())


class Admin(StrictModel):
    """A person who administers the server: a login with sudo, reached by SSH key."""

    name: str = Field(description="Login name (lowercase, not root or a system account).")
    ssh_keys: list[str] = Field(
        default_factory=list,
        description="OpenSSH public keys allowed to log in as this admin "
        "(ssh-ed25519 recommended; RSA needs at least 3072 bits). These are the only keys "
        "in the admin's authorized_keys.",
    )
    password_hash: str | SecretRef | None = Field(
        default=None,
        description="Optional password for sudo/console, as a crypt hash (yescrypt `$y$...` "
        "from `mkpasswd -m yescrypt`, or SHA-512 `$6$...`), or a reference to where that hash "
        "is kept. Never the password itself.",
    )
    sudo: bool = Field(default=True, description="Member of the sudo group.")

    @model_validator(mode="before")
    @classmethod
    def _no_plaintext(cls, data: Any) -> Any:
        if isinstance(data, dict) and "password" in data:
            raise PydanticCustomError(
                "plaintext_password",
                "plaintext passwords are refused: give `password_hash` (e.g. from "
                "`mkpasswd -m yescrypt`) or a reference {env: VAR} / {file: PATH} to it",
            )
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _USER_RE.match(v):
            raise ValueError("login names are 1-32 of a-z 0-9 _ -, starting with a letter or _")
        if v in RESERVED_USERS or v.startswith("systemd-"):
            raise ValueError(f"{v!r} is a system account; admins need a personal login name")
        return v

    @field_validator("ssh_keys")
    @classmethod
    def _keys(cls, v: list[str]) -> list[str]:
        errors = []
        out = []
        for i, key in enumerate(v):
            try:
                out.append(check_public_key(key))
            except ValueError as exc:
                errors.append(f"key {i}: {exc}")
        if errors:
            raise ValueError("; ".join(errors))
        if len(set(out)) != len(out):
            raise ValueError("the same key is listed twice")
        return out

    @field_validator("password_hash")
    @classmethod
    def _hash(cls, v: str | SecretRef | None) -> str | SecretRef | None:
        if isinstance(v, str) and not _HASH_RE.match(v):
            raise ValueError(
                "not a strong crypt hash: use yescrypt ($y$) or SHA-512 ($6$) from "
                "`mkpasswd -m yescrypt`; plaintext and MD5/DES hashes are refused"
            )
        return v


class Server(StrictModel):
    """One home server: who administers it, how it is hardened, what it runs, how it is
    backed up."""

    hostname: Hostname = Field(description="Host name (one DNS label), e.g. 'nas'.")
    domain: Domain = Field(
        description="DNS domain of the server and its services, e.g. 'example.org', or "
        "'home.arpa' for a LAN-only server.",
    )
    timezone: str = Field(default="UTC", description="IANA time zone, e.g. 'Europe/Paris'.")
    admins: list[Admin] = Field(
        min_length=1,
        description="People who administer the server (at least one, each with an SSH key).",
    )
    hardening: Hardening = Field(
        default_factory=Hardening, description="Hardening controls (all on by default)."
    )
    services: Services = Field(
        default_factory=Services, description="Services the server runs."
    )
    backup: BackupPolicy = Field(
        default_factory=BackupPolicy, description="Backup policy."
    )

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @property
    def fqdn(self) -> str:
        return f"{self.hostname}.{self.domain}"

    @property
    def base_dir(self) -> Path:
        """Directory that relative paths in the model are resolved against (the YAML's)."""
        return self._base_dir

    def with_base_dir(self, path: Path) -> Server:
        self._base_dir = path
        return self

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        if v not in _timezones():
            import difflib

            close = difflib.get_close_matches(v, sorted(_timezones()), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown time zone {v!r}{hint}")
        return v

    @model_validator(mode="after")
    def _assertions(self) -> Server:
        from selfhost.compile.checks import assertions

        problems = assertions(self)
        if problems:
            raise PydanticCustomError(
                "assertions",
                "{summary}",
                {
                    "summary": "; ".join(f"{'.'.join(map(str, loc))}: {msg}"
                                         for loc, msg in problems),
                    "problems": [[list(loc), msg] for loc, msg in problems],
                },
            )
        return self
