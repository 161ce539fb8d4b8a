"""Calendars and contacts: Radicale (Debian's package), a CalDAV/CardDAV server, behind the
web server.

Radicale listens on 127.0.0.1 only. The module asks for a virtual host with HTTP basic
auth in front of it (the web server checks the passwords, hashed with bcrypt on the
deploying machine; failed logins feed a fail2ban jail) and passes the authenticated user to
Radicale in ``X-Remote-User`` (Radicale's ``http_x_remote_user`` auth). Since Radicale then
trusts whoever connects to it, it also asks that only the web server may open connections
to its port (an nftables rule on the loopback). Each user sees only their own collections
(``owner_only`` rights).

Logins come from this model's ``users`` and from other modules: an association's members ask
for theirs with a :class:`~selfhost.compose.requests.CalendarAccount` request (the member's
single password), which this module puts next to its own users in the web server's basic
auth. A requested login with the name of one of ``users`` is an error at the requester's model
path.

Backups: Radicale writes every item to a new file and renames it into place, so each file is
whole, but a client's sync touches several items (and Radicale's cache and properties) under
Radicale's storage lock. Before each backup a consistency hook copies the collections while
holding that lock shared (``flock -s`` on ``.Radicale.lock``, the lock Radicale itself takes
with flock(2) around every write), so Radicale keeps answering and the copy is one
consistent state of the whole storage. Both the live collections and that copy are backed
up (restic stores the identical files once). ``selfhost restore ... --service radicale``
gives both back; after a crash during a sync, copy the dump's ``collections`` back into
``/var/lib/radicale/collections`` with Radicale stopped.
"""

from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from selfhost.compose.module import Contribution, Env, Problem
from selfhost.compose.requests import (
    BackupSource,
    BasicAuthUser,
    CalendarAccount,
    HealthCheck,
    Request,
    VirtualHost,
)
from selfhost.compose.resources import ManagedDir, ManagedFile, Unit
from selfhost.models.base import SecretRef, StrictModel
from selfhost.services.base import Service, container_dropin

CONFIG = "/etc/radicale/config"
COLLECTIONS = "/var/lib/radicale/collections"
DUMP = "/var/backups/selfhost/radicale"
"""Where the consistency hook copies the collections before each backup (root-only)."""


def dump_command() -> str:
    """Copy the collections under Radicale's own storage lock, held shared: writers wait,
    readers do not. Before Radicale's first write there is no lock file, and none is created
    here (a root-owned one would keep Radicale from opening it)."""
    lock, new = f"{COLLECTIONS}/.Radicale.lock", f"{DUMP}/collections.new"
    return (f"install -d -m 0700 {DUMP} && rm -rf {new} && "
            f"if [ -e {lock} ]; then flock -s -w 600 {lock} cp -a {COLLECTIONS} {new}; "
            f"else cp -a {COLLECTIONS} {new}; fi && "
            f"rm -rf {DUMP}/collections && mv {new} {DUMP}/collections")
PORT = 5232
_USER = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class CalendarUser(StrictModel):
    """A person with calendars and address books."""

    name: str = Field(description="Login name (a-z, 0-9, '.', '_', '-').")
    password: SecretRef = Field(
        description="Where the password is kept on the deploying machine ({env: VAR} or "
        "{file: PATH}); only a bcrypt hash reaches the server.",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _USER.match(v):
            raise ValueError("a login name is 1-64 of a-z 0-9 . _ -, starting with a letter "
                             "or digit")
        return v


class RadicaleService(Service):
    """CalDAV and CardDAV for calendars and contacts, reachable over HTTPS."""

    kind: ClassVar[str] = "radicale"
    uses: ClassVar[tuple[type[Request], ...]] = (VirtualHost, BackupSource, HealthCheck)
    provides: ClassVar[tuple[type[Request], ...]] = (CalendarAccount,)

    host: str = Field(
        default="dav",
        description="Host name clients connect to: a label under the server's domain ('dav'), "
        "or a full name ending in it.",
    )
    users: list[CalendarUser] = Field(
        default_factory=list, description="Who may log in (besides the logins other modules "
        "ask for, e.g. an association's members): at least one in all.")
    zone: Literal["internet", "lan", "vpn"] = Field(
        default="internet",
        description="Where clients connect from: 'internet', or only the 'lan' or the 'vpn'.",
    )
    max_upload_mb: int = Field(default=20, ge=1, le=1024,
                               description="Largest item a client may upload (MB).")

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        v = v.lower().rstrip(".")
        label = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
        if not re.fullmatch(rf"{label}(\.{label})*", v):
            raise ValueError("not a valid host name")
        return v

    @model_validator(mode="after")
    def _unique_users(self) -> RadicaleService:
        names = [u.name for u in self.users]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"users listed twice: {', '.join(dup)}")
        return self

    def fqdn(self, domain: str) -> str:
        return self.host if self.host == domain or self.host.endswith("." + domain) \
            else f"{self.host}.{domain}"

    def accounts(self, env: Env) -> list[CalendarAccount]:
        """The logins other modules asked for (:class:`CalendarAccount`), in their order, each
        name once and none of this model's own users' (those are reported as errors)."""
        seen = {u.name for u in self.users}
        out = []
        for r in env.incoming(CalendarAccount):
            if r.name not in seen:
                seen.add(r.name)
                out.append(r)
        return out

    def account_problems(self, env: Env) -> list[Problem]:
        """The requested logins, at the requester's model paths: a valid name, not one of
        this model's users; and someone to log in at all."""
        from selfhost.compose.route import loc_of

        base: tuple[str | int, ...] = ("services", "radicale", "users")
        own = {u.name: (*base, i, "name") for i, u in enumerate(self.users)}
        requested = env.incoming(CalendarAccount)
        out: list[Problem] = []
        if not self.users and not requested:
            out.append(Problem(base, "radicale has no users and no module asks for accounts: "
                               "give users (or members with a password, on an association)"))
        for r in requested:
            if not _USER.match(r.name):
                out.append(Problem(loc_of(r.origin), f"{r.name!r} cannot be a calendar login "
                                   "(1-64 of a-z 0-9 . _ -, starting with a letter or digit)"))
            elif r.name in own:
                other = own[r.name]
                out.append(Problem(loc_of(r.origin), f"calendar login {r.name} "
                                   f"({r.owner or r.origin}) is already one of radicale's users "
                                   f"({'.'.join(str(p) for p in other)})", other=other))
        return out

    def assertions(self, env: Env) -> list[Problem]:
        return self.account_problems(env)

    def requests(self, env: Env) -> list[Request]:
        logins = [BasicAuthUser(u.name, u.password) for u in self.users]
        logins += [BasicAuthUser(r.name, r.password) for r in self.accounts(env)]
        return [
            VirtualHost(self.fqdn(env.server.domain), upstream=f"127.0.0.1:{PORT}",
                        auth=tuple(logins),
                        zone=self.zone, max_body_mb=self.max_upload_mb,
                        origin=f"{env.path}.host"),
            BackupSource(COLLECTIONS),
            BackupSource(DUMP, before=dump_command()),
            HealthCheck("unit", "radicale.service"),
            HealthCheck("tcp", f"127.0.0.1:{PORT}"),
        ]

    def config(self) -> str:
        return "\n".join([
            "# Managed by selfhost: changes here are overwritten on the next deploy.",
            "[server]",
            f"hosts = 127.0.0.1:{PORT}",
            f"max_content_length = {self.max_upload_mb * 1_000_000}",
            "",
            "[auth]",
            "# The web server authenticates and passes the user in X-Remote-User; only it",
            "# may connect to this port (nftables, output chain).",
            "type = http_x_remote_user",
            "",
            "[rights]",
            "type = owner_only",
            "",
            "[storage]",
            f"filesystem_folder = {COLLECTIONS}",
            "",
            "[web]",
            "type = internal",
            "",
            "[logging]",
            "level = info",
            "mask_passwords = True",
            "",
        ])

    def contribute(self, env: Env) -> Contribution:
        c = Contribution(packages=["radicale"])
        # Debian ships the storage root-owned (the service is off until enabled): the daemon,
        # and the check below, run as radicale.
        c.directories.append(ManagedDir(COLLECTIONS, "0750", owner="radicale", group="radicale"))
        c.files.append(ManagedFile(
            CONFIG, self.config(), mode="0644",
            # Radicale reads the file, then checks a storage and exits: an empty scratch one,
            # as its own user, so that the check never touches the real collections.
            validate="d=$(runuser -u radicale -- mktemp -d) && runuser -u radicale -- radicale "
            "--config {path} --storage-filesystem-folder \"$d\" --verify-storage >/dev/null "
            "2>&1; rc=$?; [ $rc -eq 0 ] || runuser -u radicale -- radicale --config {path} "
            "--storage-filesystem-folder \"$d\" --verify-storage; rm -rf \"$d\"; exit $rc"))
        reload_on: tuple[str, ...] = (CONFIG,)
        if env.require_target().in_container:
            # Debian's unit sandboxes Radicale. Three of its settings need CAP_SYS_ADMIN, which
            # a container does not give (systemd 257 then fails the start: "Failed to keep
            # CAP_SYS_ADMIN"); the container boundary already hides the devices and the
            # kernel's modules and tunables. The others stay.
            reload_on += (container_dropin(
                c, "radicale", "radicale.service", "in a container.",
                "PrivateDevices=no\nProtectKernelModules=no\nProtectKernelTunables=no\n"),)
        c.units.append(Unit("radicale.service", reload_on=reload_on, reload=False))
        return c
