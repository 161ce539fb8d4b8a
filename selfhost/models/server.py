"""The top-level model: one server."""

from __future__ import annotations

import functools
import re
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator
from pydantic_core import PydanticCustomError

from selfhost.hardening import Hardening
from selfhost.hostcheck import HostCheck
from selfhost.models.backup import BackupPolicy
from selfhost.models.base import Domain, Hostname, SecretRef, StrictModel
from selfhost.models.ssh_keys import check_public_key
from selfhost.notify import Notify
from selfhost.services import Services

if TYPE_CHECKING:
    from selfhost.compose.module import Module

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
        "is kept. Never the password itself (for that, see `password`).",
    )
    password: SecretRef | None = Field(
        default=None,
        description="Optional password for sudo/console, as a reference to where the "
        "password is kept on the machine that runs the deploy ({env: VAR} or {file: PATH}); "
        "never the password itself. It must be strong: at least 15 characters, without the "
        "login, host or domain name, and rated 4/4 by zxcvbn (checked when the model is "
        "validated if the secret can be read there, and again by the deploy). The deploy "
        "hashes it with yescrypt; only the hash reaches the server. Exclusive with "
        "`password_hash`.",
    )
    sudo: bool = Field(default=True, description="Member of the sudo group.")
    email: str | None = Field(
        default=None, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$",
        description="Optional address where this admin gets the server's alerts (root's "
        "mail: a member's mail held over a limit, failed backups, update reports), besides "
        "`notify.email`: every admin with an address gets each alert. An outside address, "
        "or on a host with the mail service a local one (LOGIN@HOSTNAME.DOMAIN, delivered "
        "to /var/mail/LOGIN, or a mailbox of the mail domains). Not root's or "
        "postmaster's own address (a loop).",
    )

    # A plaintext password given by mistake must not end up in an error message or a log.
    model_config = ConfigDict(hide_input_in_errors=True)

    @field_validator("password", mode="before")
    @classmethod
    def _no_plaintext(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, dict | SecretRef):
            raise PydanticCustomError(
                "plaintext_password",
                "plaintext passwords are refused: give a reference {env: VAR} or "
                "{file: PATH} to where the password is kept, or `password_hash` (e.g. from "
                "`mkpasswd -m yescrypt`)",
            )
        return v

    @model_validator(mode="after")
    def _one_password(self) -> Admin:
        if self.password is not None and self.password_hash is not None:
            raise ValueError("give either `password` (a reference to the password) or "
                             "`password_hash`, not both")
        return self

    @property
    def has_password(self) -> bool:
        """Whether the admin gets a password (so sudo asks for it)."""
        return self.password is not None or self.password_hash is not None

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


class Addresses(StrictModel):
    """The host's own addresses, by where they are reached from. Other hosts of the fleet use
    them (a backup peer's address, the VPN endpoint), and the fleet's hosts never ban or
    rate-limit each other."""

    public: list[IPv4Address | IPv6Address] = Field(
        default_factory=list, description="Addresses on the internet (or behind the router's "
        "port forwarding).")
    lan: list[IPv4Address | IPv6Address] = Field(
        default_factory=list, description="Addresses on the home network.")
    vpn: list[IPv4Address | IPv6Address] = Field(
        default_factory=list, description="Addresses inside the VPN.")

    def all(self) -> list[str]:
        return [str(a) for a in (*self.public, *self.lan, *self.vpn)]


class Removal(StrictModel):
    """What a deploy does with a service that left the model. Its data is never deleted."""

    purge_packages: bool = Field(
        default=False,
        description="Purge the removed service's Debian packages (their configuration too); "
        "by default they stay installed, stopped and disabled.",
    )


class Server(StrictModel):
    """One home server: who administers it, how it is hardened, what it runs, how it is
    backed up."""

    hostname: Hostname = Field(description="Host name (one DNS label), e.g. 'nas'.")
    domain: Domain = Field(
        description="DNS domain of the server and its services, e.g. 'example.org', or "
        "'home.arpa' for a LAN-only server.",
    )
    timezone: str = Field(default="UTC", description="IANA time zone, e.g. 'Europe/Paris'.")
    time_sync: bool = Field(
        default=True,
        description="Keep the clock right with systemd-timesyncd (NTP) unless another time "
        "daemon (chrony, ntpsec, openntpd) is already installed: TLS certificates, TOTP "
        "codes, logs and backup schedules need a correct clock. systemd does not run it "
        "inside a container, where the host keeps the time.",
    )
    addresses: Addresses = Field(
        default_factory=Addresses,
        description="This host's addresses (public, LAN, VPN), for the fleet's other hosts.",
    )
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
    check: HostCheck = Field(
        default_factory=HostCheck,
        description="The daily check on the server (drift from the last deploy, health); the "
        "admin is mailed when it gets worse.",
    )
    removal: Removal = Field(
        default_factory=Removal,
        description="What happens to a service removed from the model (its data is kept).",
    )
    notify: Notify | None = Field(
        default=None,
        description="Mail to the admin through an SMTP relay (update reports, failed or late "
        "backups). Without it, reports go to the journal only.",
    )

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    # Pydantic's own rendering of an error shows the input: a plaintext password given by
    # mistake must not end up in a traceback or a log (the YAML loader never shows inputs).
    model_config = ConfigDict(hide_input_in_errors=True)

    @property
    def fqdn(self) -> str:
        return f"{self.hostname}.{self.domain}"

    @property
    def alert_addresses(self) -> list[str]:
        """Where root's mail (the alerts) goes: ``notify.email`` and every admin's ``email``,
        each once, in the model's order."""
        out: list[str] = []
        for a in ([self.notify.email] if self.notify is not None else []) + [
                a.email for a in self.admins if a.email is not None]:
            if a.lower() not in (o.lower() for o in out):
                out.append(a)
        return out

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

    def modules(self) -> list[tuple[str, Module]]:
        """Every module of this host with its model path, in a fixed order (the router then
        orders providers after their users)."""
        from selfhost.backup.fleet import BackupPeers
        from selfhost.services.knot import KnotServer
        from selfhost.services.mail import BackupMxServer
        from selfhost.services.mailman import MailmanService
        from selfhost.services.web import WebService
        from selfhost.services.wireguard import WireGuardTunnels
        from selfhost.system import Records, System

        out: list[tuple[str, Module]] = [("system", System())]
        if self.notify is not None:
            out.append(("notify", self.notify))
        h = self.hardening
        for name in type(h).model_fields:
            out.append((f"hardening.{name}", getattr(h, name)))
        for name in type(self.services).model_fields:
            svc = getattr(self.services, name)
            if svc is None and name == "web":
                svc = WebService(sites=[])  # the provider of virtual hosts, with no sites
            if svc is None and name == "lists":
                svc = MailmanService()  # the provider of mailing lists, with none of its own
            if svc is not None and svc.enabled:
                out.append((f"services.{name}", svc))
        out += [("wireguard-tunnels", WireGuardTunnels()),
                ("backup", self.backup), ("backup-peers", BackupPeers()),
                ("dns-server", KnotServer()), ("backup-mx", BackupMxServer()),
                ("check", self.check), ("records", Records())]
        return out

    def weak_passwords(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Admin passwords that can be read on this machine and are too weak. A secret that
        cannot be read here is checked by the deploy, where it is read."""
        from selfhost.models.passwords import password_problems

        min_length = self.password_min_length
        out: list[tuple[tuple[str | int, ...], str]] = []
        for i, admin in enumerate(self.admins):
            if admin.password is None:
                continue
            try:
                value = admin.password.resolve()
            except LookupError:
                continue
            problems = password_problems(value, login=admin.name, hostname=self.hostname,
                                         domain=self.domain, min_length=min_length)
            if problems:
                out.append((("admins", i, "password"),
                            f"the password from {admin.password.describe()} is too weak: "
                            + "; ".join(problems)))
        return out

    @property
    def password_min_length(self) -> int:
        """Shortest accepted admin password: 15, or the accounts control's minimum if longer."""
        from selfhost.models.passwords import MIN_LENGTH

        return max(MIN_LENGTH, self.hardening.accounts.password_min_length)
