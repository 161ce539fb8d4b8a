"""File sync: Syncthing (Debian's package), one instance per user of the host.

Each user listed runs Debian's ``syncthing@USER.service`` (the template unit, ``User=%i``),
with its state (key, certificate, config.xml, index database) in ``/var/lib/syncthing/USER``
(a drop-in gives ``--home``). A user is an admin of the server (their folders go under
``/home/USER``) or gets a system account of their own, without a login (``/srv/sync/USER``).

The device identity. By default Syncthing makes its key and certificate on the server the
first time (``syncthing generate``): the private key never leaves it, and the device ID is
read there (``syncthing serve --home=/var/lib/syncthing/USER --device-id``, or the GUI). A
model may instead give a certificate and key of its own (``identity``: files on the deploying
machine, uploaded as secrets), to keep a device ID across a reinstall or to know it in
advance.

The model's devices, folders and options are applied through Syncthing's REST API (with the
API key from its config.xml, passed to curl on its standard input), by a script the deploy
runs when the model's part changed (``/etc/selfhost/syncthing/USER/*.json``): Syncthing
checks each part and refuses a bad one before it changes anything, and writes its config.xml
itself, so that what it adds there (its own device, defaults) never makes a re-deploy see a
difference. A re-deploy with an unchanged model runs nothing.

Privacy (seed texts: "own your data"): local discovery, global discovery, relays, NAT
traversal (UPnP), usage and crash reporting are off unless the model turns them on, and they
are turned off in the generated configuration before Syncthing first starts. Devices are then
reached at the addresses the model gives (``tcp://nas.home.arpa:22000``).

The GUI and REST API listen on 127.0.0.1 only (``--gui-address``), without a password, and
the firewall lets only that user (and root) open connections to its port. The model
configures everything; the GUI is for looking: with ``hardening.ssh.allow_tcp_forwarding``
(off by default), ``ssh -L 8384:127.0.0.1:8384 USER@host`` (as that user) opens it. It is
not published through the web server: a reverse proxy with its own login would put a second
set of credentials in front of a tool that can read every synced file; the SSH tunnel reuses
the login the host already has.

The sync protocol port (22000 by default, one per user) is requested in TCP and in UDP (QUIC)
in the model's zone. Folder paths are backup sources (Syncthing writes each file to a
temporary name and renames it into place: every file backed up is whole), and so are the
device's key and certificate.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shlex
import ssl
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from selfhost.compose.module import Contribution, Env, Problem
from selfhost.compose.requests import (
    BackupSource,
    HealthCheck,
    LoopbackGuard,
    Port,
    Request,
    SystemUser,
)
from selfhost.compose.resources import Command, ManagedDir, ManagedFile, Unit
from selfhost.models.base import StrictModel, data_path
from selfhost.services.base import Service

STATE_ROOT = "/var/lib/syncthing"
MODEL_ROOT = "/etc/selfhost/syncthing"
SYSTEM_HOMES = "/srv/sync"
APPLY_SCRIPT = "/usr/local/lib/selfhost/syncthing-apply"
APPLY_SH = (Path(__file__).parent / "syncthing-apply.sh").read_text(encoding="utf-8")
LOCAL_DISCOVERY_PORT = 21027
RELAY_POOL = "dynamic+https://relays.syncthing.net/endpoint"

_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_FOLDER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ADDRESS = re.compile(r"^(dynamic|(tcp|tcp4|tcp6|quic|quic4|quic6)://"
                      r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?)$")
_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


def _luhn32(s: str) -> str:
    """Syncthing's check character of a 13-character group (Luhn mod 32 over base32)."""
    factor, total = 1, 0
    for ch in s:
        addend = factor * _B32.index(ch)
        factor = 1 if factor == 2 else 2
        total += addend // 32 + addend % 32
    return _B32[(32 - total % 32) % 32]


def device_id_of(digest: bytes) -> str:
    """The device ID of a certificate's SHA-256: base32, a check character after each 13,
    in groups of 7 separated by '-'."""
    b32 = base64.b32encode(digest).decode().rstrip("=")
    with_checks = "".join(b32[i:i + 13] + _luhn32(b32[i:i + 13]) for i in range(0, 52, 13))
    return "-".join(with_checks[i:i + 7] for i in range(0, 56, 7))


def device_id_of_cert(pem: str) -> str:
    """The device ID of a PEM certificate (what ``syncthing --device-id`` prints)."""
    return device_id_of(hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).digest())


def check_device_id(value: str) -> str:
    """A Syncthing device ID (8 groups of 7 base32 characters, with its check characters),
    normalised to upper case with dashes."""
    raw = value.strip().upper().replace("-", "").replace(" ", "")
    if len(raw) != 56 or any(ch not in _B32 for ch in raw):
        raise ValueError("not a Syncthing device ID (8 groups of 7 of A-Z 2-7, e.g. "
                         "MFZWI3D-BONSGYC-...; the GUI's Actions > Show ID)")
    for i in range(0, 56, 14):
        if _luhn32(raw[i:i + 13]) != raw[i + 13]:
            raise ValueError("not a Syncthing device ID: a check character is wrong (a typo?)")
    return "-".join(raw[i:i + 7] for i in range(0, 56, 7))


class SyncDevice(StrictModel):
    """Another Syncthing device this user's folders are shared with (a laptop, a phone,
    another server)."""

    name: str = Field(description="Short name (a-z, 0-9, '.', '_', '-'), used by folders.")
    id: str = Field(description="Its device ID (the GUI's Actions > Show ID, or "
                    "`syncthing --device-id`).")
    addresses: list[str] = Field(
        default_factory=lambda: ["dynamic"],
        description="Where to reach it: 'tcp://HOST:PORT' or 'quic://HOST:PORT' (it may also "
        "connect here), or 'dynamic' (found by discovery, which is off unless turned on).",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("a device name is 1-64 of a-z 0-9 . _ -")
        return v

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        return check_device_id(v)

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        for a in v:
            if not _ADDRESS.match(a):
                raise ValueError(f"{a!r}: an address is 'dynamic', or tcp://HOST:PORT or "
                                 "quic://HOST:PORT")
        return v


class SyncFolder(StrictModel):
    """A folder kept in sync with some of the user's devices."""

    id: str = Field(description="Folder ID, the same on every device that shares it "
                    "(A-Z a-z 0-9 . _ -).")
    label: str = Field(default="", description="Name shown in the GUI (default: the ID).")
    path: str | None = Field(default=None, description="Directory on this host (default: "
                             "<home>/Sync/<id>); backed up.")
    devices: list[str] = Field(default_factory=list, description="Names of the user's devices "
                               "it is shared with.")
    type: Literal["sendreceive", "sendonly", "receiveonly"] = Field(
        default="sendreceive", description="Send and receive changes, only send this host's, "
        "or only receive (this host's changes are not sent)."
    )

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not _FOLDER_ID.match(v):
            raise ValueError("a folder ID is 1-64 of A-Z a-z 0-9 . _ -")
        return v

    @field_validator("label")
    @classmethod
    def _label(cls, v: str) -> str:
        if any(ch in v for ch in "\n\r\t"):
            raise ValueError("a label is one line")
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        return data_path(v, "/srv/photos/all")


class SyncIdentity(StrictModel):
    """A device identity made beforehand (``syncthing generate``, or any X.509 certificate and
    its key): files on the deploying machine, uploaded as secrets."""

    cert: str = Field(description="Path of the certificate (cert.pem), relative to the model "
                      "file.")
    key: str = Field(description="Path of its private key (key.pem), relative to the model "
                     "file; readable only by you.")


class SyncUser(StrictModel):
    """A user of the host with their own Syncthing."""

    name: str = Field(description="Account name: an admin of the server, or a new account "
                      "without a login (a-z, 0-9, '_', '-').")
    port: int = Field(default=22000, ge=1024, le=65535, description="Sync protocol port "
                      "(TCP, and UDP for QUIC); each user needs their own.")
    gui_port: int = Field(default=8384, ge=1024, le=65535, description="GUI and REST API port "
                          "on 127.0.0.1; each user needs their own.")
    identity: SyncIdentity | None = Field(default=None, description="A certificate and key of "
                                          "your own (default: made on the server, once).")
    devices: list[SyncDevice] = Field(default_factory=list, description="The devices this "
                                      "user syncs with.")
    folders: list[SyncFolder] = Field(default_factory=list, description="The folders.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        from selfhost.models.server import RESERVED_USERS  # (it imports the services)

        if not _USER.match(v):
            raise ValueError("an account name is 1-32 of a-z 0-9 _ -, starting with a letter "
                             "or _")
        if v in RESERVED_USERS or v.startswith("systemd-") or v == "syncthing":
            raise ValueError(f"{v!r} is a system account: give a person's name")
        return v

    @model_validator(mode="after")
    def _refs(self) -> SyncUser:
        for what, values in (("device name", [d.name for d in self.devices]),
                             ("device ID", [d.id for d in self.devices]),
                             ("folder ID", [f.id for f in self.folders])):
            dup = sorted({v for v in values if values.count(v) > 1})
            if dup:
                raise ValueError(f"{self.name}: {what} listed twice: {', '.join(dup)}")
        names = {d.name for d in self.devices}
        for f in self.folders:
            unknown = [d for d in f.devices if d not in names]
            if unknown:
                raise ValueError(f"{self.name}: folder {f.id} names unknown devices: "
                                 f"{', '.join(unknown)} (list them under devices)")
        return self

    @property
    def state(self) -> str:
        return f"{STATE_ROOT}/{self.name}"

    @property
    def unit(self) -> str:
        return f"syncthing@{self.name}.service"


class SyncthingService(Service):
    """File sync with Syncthing, for named users of the host."""

    kind: ClassVar[str] = "sync"
    uses: ClassVar[tuple[type[Request], ...]] = (Port, SystemUser, BackupSource, HealthCheck,
                                                 LoopbackGuard)

    users: list[SyncUser] = Field(min_length=1, description="Who runs Syncthing here.")
    zone: Literal["internet", "lan", "vpn"] = Field(
        default="internet", description="Where devices connect from (the sync protocol is "
        "encrypted and only listed devices are accepted): 'internet', or only the 'lan' or "
        "the 'vpn'.")
    local_discovery: bool = Field(
        default=False, description="Announce this host on the LAN and find devices there "
        "(UDP broadcasts on port 21027); off: devices need addresses.")
    global_discovery: bool = Field(
        default=False, description="Announce this host's address and device ID to "
        "Syncthing's public discovery servers, and look devices up there (and use STUN).")
    relays: bool = Field(
        default=False, description="Connect through Syncthing's public relays when a direct "
        "connection fails (the relay sees who talks to whom, not the data).")
    nat_traversal: bool = Field(
        default=False, description="Ask the home router to forward the sync port (UPnP / "
        "NAT-PMP).")

    def assertions(self, env: Env) -> list[Problem]:
        out: list[Problem] = []
        base: tuple[str | int, ...] = ("services", "sync", "users")
        seen: dict[tuple[str, int], int] = {}
        names: dict[str, int] = {}
        for i, u in enumerate(self.users):
            if u.name in names:
                out.append(Problem((*base, i, "name"), f"user {u.name} is listed twice",
                                   other=(*base, names[u.name], "name")))
            names.setdefault(u.name, i)
            for field, port in (("port", u.port), ("gui_port", u.gui_port)):
                for kind in ("port", "gui_port"):
                    if (kind, port) in seen:
                        j = seen[(kind, port)]
                        out.append(Problem((*base, i, field), f"user {u.name}'s {field} {port} is "
                                           f"also user {self.users[j].name}'s {kind}: give each "
                                           "user their own ports",
                                           other=(*base, j, kind)))
                seen.setdefault((field, port), i)
            if not (self.local_discovery or self.global_discovery):
                for k, d in enumerate(u.devices):
                    if d.addresses == ["dynamic"] or not d.addresses:
                        out.append(Problem(
                            (*base, i, "devices", k, "addresses"),
                            f"device {d.name} has no address and discovery is off: this host "
                            "only finds it when it connects here", severity="warning"))
        return out

    def home(self, env: Env, user: SyncUser) -> str:
        admins = {a.name for a in env.server.admins}
        return f"/home/{user.name}" if user.name in admins else f"{SYSTEM_HOMES}/{user.name}"

    def folder_path(self, env: Env, user: SyncUser, folder: SyncFolder) -> str:
        return folder.path or f"{self.home(env, user)}/Sync/{folder.id}"

    def requests(self, env: Env) -> list[Request]:
        admins = {a.name for a in env.server.admins}
        out: list[Request] = []
        for i, u in enumerate(self.users):
            origin = f"{env.path}.users.{i}"
            if u.name not in admins:
                out.append(SystemUser(u.name, home=self.home(env, u), origin=origin))
            out += [Port(u.port, "tcp", self.zone, comment=f"Syncthing ({u.name})",
                         origin=f"{origin}.port"),
                    Port(u.port, "udp", self.zone, comment=f"Syncthing QUIC ({u.name})",
                         origin=f"{origin}.port"),
                    LoopbackGuard(u.gui_port, (u.name, "root"), origin=f"{origin}.gui_port"),
                    BackupSource(f"{u.state}/cert.pem", origin=origin),
                    BackupSource(f"{u.state}/key.pem", origin=origin),
                    HealthCheck("unit", u.unit, origin=origin),
                    HealthCheck("tcp", f"127.0.0.1:{u.gui_port}", origin=origin)]
            out += [BackupSource(self.folder_path(env, u, f), origin=f"{origin}.folders.{k}")
                    for k, f in enumerate(u.folders)]
        if self.local_discovery:
            out.append(Port(LOCAL_DISCOVERY_PORT, "udp", "lan", comment="Syncthing local "
                            "discovery", origin=f"{env.path}.local_discovery"))
        return out

    # ------------------------------------------------------------------ rendered files

    def dropin(self, user: SyncUser, in_container: bool = False) -> str:
        lines = [
            "# Managed by selfhost: this user's Syncthing, its state and its GUI (127.0.0.1).",
            "[Service]",
            "ExecStart=",
            "ExecStart=/usr/bin/syncthing serve --no-browser --no-restart --logflags=0 "
            f"--home={user.state} --gui-address=http://127.0.0.1:{user.gui_port}",
        ]
        if in_container:
            # Debian's unit installs seccomp filters (these two settings) after switching to
            # the user, which needs CAP_SYS_ADMIN that a container does not give: systemd 257
            # then fails the start ("Failed to keep CAP_SYS_ADMIN"). The rest of its sandbox
            # stays.
            lines += ["SystemCallArchitectures=", "MemoryDenyWriteExecute=no"]
        return "\n".join(lines) + "\n"

    def devices_json(self, user: SyncUser) -> str:
        devices = [{"deviceID": d.id, "name": d.name, "addresses": d.addresses,
                    "compression": "metadata", "introducer": False,
                    "autoAcceptFolders": False, "paused": False}
                   for d in sorted(user.devices, key=lambda d: d.name)]
        return json.dumps(devices, indent=2, sort_keys=True) + "\n"

    def folders_json(self, env: Env, user: SyncUser) -> str:
        ids = {d.name: d.id for d in user.devices}
        folders = [{"id": f.id, "label": f.label or f.id, "path": self.folder_path(env, user, f),
                    "type": f.type, "paused": False, "fsWatcherEnabled": True,
                    "devices": [{"deviceID": ids[n]} for n in sorted(f.devices)]}
                   for f in sorted(user.folders, key=lambda f: f.id)]
        return json.dumps(folders, indent=2, sort_keys=True) + "\n"

    def options_json(self, user: SyncUser) -> str:
        listen = [f"tcp://:{user.port}", f"quic://:{user.port}"]
        if self.relays:
            listen.append(RELAY_POOL)
        options = {
            "listenAddresses": listen,
            "localAnnounceEnabled": self.local_discovery,
            "globalAnnounceEnabled": self.global_discovery,
            "relaysEnabled": self.relays,
            "natEnabled": self.nat_traversal,
            # STUN servers are only asked when global discovery may publish what they tell.
            "stunKeepaliveStartS": 180 if self.global_discovery else 0,
            "urAccepted": -1,  # usage reporting declined (the GUI stops asking)
            "crashReportingEnabled": False,
            "startBrowser": False,
        }
        return json.dumps(options, indent=2, sort_keys=True) + "\n"

    def contribute(self, env: Env) -> Contribution:
        q = shlex.quote
        admins = {a.name for a in env.server.admins}
        c = Contribution(packages=["syncthing", "curl"])
        c.directories += [ManagedDir(STATE_ROOT, "0755"), ManagedDir(MODEL_ROOT, "0755")]
        c.files.append(ManagedFile(APPLY_SCRIPT, APPLY_SH, mode="0755",
                                   validate="sh -n {path}"))
        if any(u.name not in admins for u in self.users):
            c.directories.append(ManagedDir(SYSTEM_HOMES, "0755"))
        for u in sorted(self.users, key=lambda u: u.name):
            n = u.name
            if u.name not in admins:
                c.directories.append(ManagedDir(self.home(env, u), "0700", owner=n, group=n))
            c.directories.append(ManagedDir(u.state, "0700", owner=n, group=n))
            if any(f.path is None for f in u.folders):
                c.directories.append(ManagedDir(f"{self.home(env, u)}/Sync", "0700", owner=n,
                                                group=n))
            c.directories += [ManagedDir(self.folder_path(env, u, f), "0700", owner=n, group=n)
                              for f in sorted(u.folders, key=lambda f: f.id)]
            identity: tuple[str, ...] = ()
            if u.identity is not None:
                base = env.server.base_dir
                for name, src in (("cert.pem", u.identity.cert), ("key.pem", u.identity.key)):
                    c.files.append(ManagedFile(f"{u.state}/{name}", "", mode="0600", owner=n,
                                               group=n,
                                               secret_file=str(base / src)))
                identity = (f"{u.state}/cert.pem", f"{u.state}/key.pem")
            dropin = f"/etc/systemd/system/syncthing@{u.name}.service.d/selfhost.conf"
            c.files.append(ManagedFile(dropin, self.dropin(u, env.require_target().in_container)))
            model = f"{MODEL_ROOT}/{u.name}"
            c.directories.append(ManagedDir(model, "0755"))
            parts = {"devices.json": self.devices_json(u),
                     "folders.json": self.folders_json(env, u),
                     "options.json": self.options_json(u)}
            # Syncthing's API checks them when they are applied (the script stops at a refusal).
            c.files += [ManagedFile(f"{model}/{name}", content) for name, content in parts.items()]
            st = q(u.state)
            # The key (unless the model gave one) and a first config.xml, made by Syncthing
            # itself, with what would talk to the outside turned off before its first start
            # (the model's options follow through the API).
            private = ("globalAnnounceEnabled", "localAnnounceEnabled", "relaysEnabled",
                       "natEnabled", "crashReportingEnabled", "startBrowser")
            c.commands.append(Command(
                f"sync: {u.name}'s Syncthing device key and first configuration",
                f"runuser -u {q(u.name)} -- syncthing generate --home={st} --no-default-folder "
                f">/dev/null && sed -i -E 's:<({'|'.join(private)})>true<:<\\1>false<:' "
                f"{st}/config.xml",
                unless=f"test -s {st}/config.xml", after_files=True))
            c.commands.append(Command(
                f"sync: {u.name}'s devices, folders and options, through Syncthing's API",
                f"{APPLY_SCRIPT} {q(u.name)} {st} {u.gui_port} {q(model)}",
                on_change=(APPLY_SCRIPT, dropin, *identity,
                           *(f"{model}/{n}" for n in parts))))
            c.units.append(Unit(u.unit, reload=False))
        return c
