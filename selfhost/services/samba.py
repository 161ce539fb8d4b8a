"""NAS: Samba (Debian's package), Windows/macOS/Linux file shares over SMB3 only.

Shares and users come from the model. The server speaks SMB3 only (``server min protocol =
SMB3``: no SMB1/NT1, no SMB2.x), with encryption and signing required, NTLMv2 only, no
NetBIOS (``nmbd`` is switched off, port 445 only) and no anonymous access; printing is off.
Each share lists who may open it (``valid users``) and who of those may write (``write
list``): everyone else on the list reads only (the share is ``read only`` and the write list
is Samba's exception to it, so a separate read list would say nothing more). A share is open
to guests (read only, without a password) only when the model asks for it with a ``reason``.
Port 445 is requested in the LAN or the VPN zone, never the internet. Share data paths are
backup sources.

Users. A Samba user must be a Unix user: each one that is not an admin of the server gets a
system account (``useradd --system``, no login shell, no home); every user of a share is in
its group ``smb-<share>``, which owns the share's directory (setgid, mode 2770), so files a
user writes belong to that user and the share's group.

Passwords stay references in the model ({env: ...} or {file: ...}). Samba's password database
(tdbsam) holds the NT hash of each password (MD4 of the UTF-16LE password, unsalted: the
hash is all an SMB client proves it knows). The deploying machine computes it at deploy time
(:func:`selfhost.models.ntlm.nt_hash`) and uploads the hashes as one smbpasswd-format file,
``/var/lib/samba/private/selfhost-users.smbpasswd``, mode 0600, root's, written over the
backend's secret-file path (never in the plan, a log or a command line). When that file
changes, a command imports it into the tdbsam with ``pdbedit -i smbpasswd:FILE`` (a copy in
the same root-only directory with each user's Unix uid filled in, which the smbpasswd format
needs; the hashes only pass through the shell's built-in ``printf``, never an argument of a
program) and removes from the tdbsam the users the model no longer lists. The plain password
never reaches the server. Since the hash is unsalted, the same password gives the same file:
a second deploy finds it unchanged and runs nothing (the file's content is the hash marker).

Failed logins: ``log level = 1 auth_audit:3`` logs every SMB authentication (failures at
level 2, successes at 3) to the journal (``logging = systemd``), and a fail2ban jail bans an
address after repeated failures (wrong password or unknown user). The jail matches the
journal's ``SYSLOG_IDENTIFIER=smbd``, not the unit: smbd serves each client in a short-lived
child process, and the journal often cannot attribute the lines of a process that has
already exited to ``smbd.service``.

The configuration is checked with ``testparm -s`` on the target before it replaces the live
one (and refused if testparm ignores a parameter: an unknown or deprecated one); a change
restarts smbd (a reload would keep listening on the ports of the old configuration).

In a container (cgroup v1, whose release notifications a container's systemd never gets),
stopping smbd races: when smbd's helper processes (notifyd, cleanupd) outlive the main
process by a moment, systemd waits for a "cgroup empty" event that never comes, until the
stop times out (90 s by default; measured: about one restart in two). A drop-in there
shortens the stop timeout to 5 s (smbd itself stops in well under a second); systemd then
notes the stop "timed out" and starts smbd again as usual.
"""

from __future__ import annotations

import re
import shlex
from pathlib import PurePosixPath
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from selfhost.compose.module import Contribution, Env, Problem
from selfhost.compose.requests import (
    BackupSource,
    HealthCheck,
    Jail,
    Port,
    Request,
    SystemUser,
)
from selfhost.compose.resources import (
    SECRET_MARK,
    Command,
    ManagedDir,
    ManagedFile,
    SecretPiece,
    Unit,
)
from selfhost.models.base import SecretRef, StrictModel, data_path
from selfhost.services.base import Service, container_dropin

CONFIG = "/etc/samba/smb.conf"
PASSDB_DIR = "/var/lib/samba/private"
USERS_FILE = f"{PASSDB_DIR}/selfhost-users.smbpasswd"
PORT = 445
SHARE_ROOT = "/srv/nas"
_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_SHARE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,23}$")
RESERVED_SHARES = ("global", "homes", "printers", "print$", "ipc$")
DAEMON_USERS = {"radicale", "syncthing", "prosody", "unbound", "knot", "nsd", "bind", "tss",
                "polkitd", "statd", "_rpc", "fail2ban", "debian-tor", "systemd-network"}
"""Accounts of Debian's daemons: a share user may not take one over (besides
:data:`selfhost.models.server.RESERVED_USERS`)."""

VALIDATE = (
    # testparm exits 0 even when it ignores an unknown parameter: refuse that too.
    "out=$(testparm -s {path} 2>&1 >/dev/null); rc=$?; printf '%s\\n' \"$out\" >&2; "
    "[ $rc -eq 0 ] || exit $rc; ! printf '%s\\n' \"$out\" | "
    "grep -E 'Unknown parameter|Ignoring|deprecated|Error'"
)

_FAILED = "WRONG_PASSWORD|NO_SUCH_USER|LOGON_FAILURE|ACCOUNT_DISABLED|ACCOUNT_LOCKED_OUT"
JAIL_FILTER = (
    "# Managed by selfhost: failed SMB logins, from Samba's authentication audit\n"
    "# (log level auth_audit:2 and above, one journal line per attempt, SYSLOG_IDENTIFIER=smbd).\n"
    "# Each client-given field is matched up to its closing bracket, so that a user or\n"
    "# workstation name cannot bring its own 'remote host'.\n"
    "[INCLUDES]\n"
    "before = common.conf\n"
    "\n"
    "[Definition]\n"
    "_daemon = smbd\n"
    r"failregex = ^%(__prefix_line)s\s*Auth: \[[^\]]*\] user \[[^\]]*\]\\\[[^\]]*\] at \[[^\]]*\] "
    r"with \[[^\]]*\] status \[NT_STATUS_(?:" + _FAILED + r")\] workstation \[[^\]]*\] "
    r"remote host \[ipv[46]:<ADDR>:\d+\]" "\n"
)


class SambaUser(StrictModel):
    """Someone who may log in to the shares."""

    name: str = Field(description="Login name (a Unix account name: a-z, 0-9, '_', '-', "
                      "starting with a letter or '_'). Not an admin's name unless that admin "
                      "uses the shares.")
    password: SecretRef = Field(
        description="Where the password is kept on the deploying machine ({env: VAR} or "
        "{file: PATH}); only its NT hash reaches the server, in a root-only file.",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _USER.match(v):
            raise ValueError("a login name is 1-32 of a-z 0-9 _ -, starting with a letter or _")
        from selfhost.models.server import RESERVED_USERS  # (it imports the services)

        if v in RESERVED_USERS or v in DAEMON_USERS or v.startswith(("systemd-", "smb-")):
            raise ValueError(f"{v!r} is a system account: a share user needs a personal name")
        return v


class GuestAccess(StrictModel):
    """Read access without a password, for anyone who reaches the share."""

    reason: str = Field(min_length=3, description="Why this share is open to guests (shown "
                        "in plans).")


class Share(StrictModel):
    """A shared folder."""

    name: str = Field(description="Share name clients see (a-z, 0-9, '_', '-'; up to 24).")
    path: str | None = Field(default=None, description="Directory on the server (default "
                             "/srv/nas/<name>); backed up.")
    comment: str = Field(default="", description="Description clients show.")
    valid_users: list[str] = Field(default_factory=list, description="Who may open the share "
                                   "(Samba users of this service); they read only unless in "
                                   "write_list.")
    write_list: list[str] = Field(default_factory=list, description="Who of valid_users may "
                                  "also write.")
    guest: GuestAccess | None = Field(default=None, description="Let anyone read the share "
                                      "without a password (read only); needs a reason. Off by "
                                      "default.")
    browseable: bool = Field(default=True, description="Listed when a client browses the "
                             "server.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _SHARE.match(v) or v in RESERVED_SHARES:
            raise ValueError("a share name is 1-24 of a-z 0-9 _ -, starting with a letter or "
                             f"digit, and not one of {', '.join(RESERVED_SHARES)}")
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        return data_path(v, "/srv/nas/media")

    @field_validator("comment")
    @classmethod
    def _comment(cls, v: str) -> str:
        if any(ch in v for ch in "\n\r[]"):
            raise ValueError("a comment is one line without brackets")
        return v

    @property
    def directory(self) -> str:
        return self.path or f"{SHARE_ROOT}/{self.name}"

    @property
    def group(self) -> str:
        return f"smb-{self.name}"


class SambaService(Service):
    """File shares for the home network (SMB3), from Debian's Samba."""

    kind: ClassVar[str] = "samba"
    uses: ClassVar[tuple[type[Request], ...]] = (Port, SystemUser, BackupSource, Jail,
                                                 HealthCheck)

    workgroup: str = Field(default="WORKGROUP", pattern=r"^[A-Z0-9][A-Z0-9-]{0,14}$",
                           description="Workgroup name (Windows' default: WORKGROUP).")
    zone: Literal["lan", "vpn"] = Field(
        default="lan",
        description="Where clients connect from: the 'lan' or the 'vpn' (SMB is never opened "
        "to the internet: reach it through the VPN).",
    )
    users: list[SambaUser] = Field(default_factory=list, description="Who may log in.")
    shares: list[Share] = Field(min_length=1, description="The shared folders.")

    def assertions(self, env: Env) -> list[Problem]:
        out: list[Problem] = []
        base = ("services", "samba")
        names = [u.name for u in self.users]
        admins = {a.name for a in env.server.admins}
        for i, u in enumerate(self.users):
            if names.index(u.name) != i:
                out.append(Problem((*base, "users", i, "name"), f"user {u.name} is listed twice",
                                   other=(*base, "users", names.index(u.name), "name")))
            if u.name in admins:
                out.append(Problem((*base, "users", i, "name"), f"user {u.name} is also an admin: "
                                   "the shares use the admin's account", severity="warning"))
        seen_names: dict[str, int] = {}
        seen_paths: dict[str, int] = {}
        for i, s in enumerate(self.shares):
            loc = (*base, "shares", i)
            if s.name in seen_names:
                out.append(Problem((*loc, "name"), f"two shares are named {s.name}",
                                   other=(*base, "shares", seen_names[s.name], "name")))
            seen_names.setdefault(s.name, i)
            d = PurePosixPath(s.directory)
            for j_path, j in seen_paths.items():
                other = PurePosixPath(j_path)
                if d == other or other in d.parents or d in other.parents:
                    out.append(Problem((*loc, "path"), f"share {s.name}'s directory {d} is "
                                       f"{'the same as' if d == other else 'inside or around'} "
                                       f"share {self.shares[j].name}'s ({other})",
                                       other=(*base, "shares", j, "path")))
            seen_paths.setdefault(s.directory, i)
            for field in ("valid_users", "write_list"):
                for k, name in enumerate(getattr(s, field)):
                    if name not in names:
                        out.append(Problem((*loc, field, k), f"share {s.name}: {name} is not a "
                                           "user of services.samba.users"))
            for k, name in enumerate(s.write_list):
                if name in names and s.guest is None and name not in s.valid_users:
                    out.append(Problem((*loc, "write_list", k), f"share {s.name}: {name} may "
                                       "write but is not in valid_users"))
            if s.guest is None and not s.valid_users:
                out.append(Problem((*loc, "valid_users"), f"share {s.name} has no valid_users "
                                   "(and is not open to guests): nobody could open it"))
        return out

    def _groups_of(self, user: str) -> tuple[str, ...]:
        return tuple(sorted(s.group for s in self.shares
                            if user in s.valid_users or user in s.write_list))

    def requests(self, env: Env) -> list[Request]:
        admins = {a.name for a in env.server.admins}
        out: list[Request] = [Port(PORT, "tcp", self.zone, comment="Samba (SMB3)",
                                   origin=f"{env.path}.zone")]
        for i, u in enumerate(self.users):
            if u.name not in admins:
                out.append(SystemUser(u.name, groups=self._groups_of(u.name),
                                      origin=f"{env.path}.users.{i}"))
        out += [BackupSource(s.directory, origin=f"{env.path}.shares.{i}")
                for i, s in enumerate(self.shares)]
        out += [
            Jail("samba", port=str(PORT), filter="selfhost-samba",
                 journalmatch="SYSLOG_IDENTIFIER=smbd", filter_definition=JAIL_FILTER),
            HealthCheck("unit", "smbd.service"),
            HealthCheck("tcp", f"127.0.0.1:{PORT}"),
        ]
        return out

    def config(self, hostname: str) -> str:
        guests = any(s.guest for s in self.shares)
        lines = [
            "# Managed by selfhost: changes here are overwritten on the next deploy.",
            "[global]",
            "   server role = standalone server",
            f"   workgroup = {self.workgroup}",
            f"   server string = {hostname}",
            "   security = user",
            "   passdb backend = tdbsam",
            "   # SMB3 only, encrypted and signed; NTLMv2 only.",
            "   server min protocol = SMB3",
            "   server smb encrypt = required",
            "   server signing = mandatory",
            "   ntlm auth = ntlmv2-only",
            "   # No NetBIOS (nmbd is off): port 445 only.",
            "   disable netbios = yes",
            f"   smb ports = {PORT}",
            "   restrict anonymous = 2",
            # Only guest shares need a wrong user name mapped to the guest account.
            f"   map to guest = {'bad user' if guests else 'never'}",
            "   guest account = nobody",
            "   load printers = no",
            "   printing = bsd",
            "   printcap name = /dev/null",
            "   disable spoolss = yes",
            "   usershare max shares = 0",
            "   unix password sync = no",
            "   # Every authentication in the journal (failures at level 2): fail2ban reads it.",
            "   logging = systemd",
            "   log level = 1 auth_audit:3",
        ]
        for s in sorted(self.shares, key=lambda s: s.name):
            lines += ["", f"[{s.name}]", f"   path = {s.directory}"]
            lines.append(f"   comment = {s.comment}")  # always a line, empty or not
            lines += [f"   browseable = {'yes' if s.browseable else 'no'}",
                      "   read only = yes"]
            if s.guest is not None:
                lines += [f"   # Open to guests (read only): {s.guest.reason}",
                          "   guest ok = yes"]
            else:
                lines += ["   guest ok = no",
                          f"   valid users = {' '.join(sorted(set(s.valid_users)))}"]
            if s.write_list:
                lines.append(f"   write list = {' '.join(sorted(set(s.write_list)))}")
            # New files: the writer's, in the share's group (the directory is setgid).
            if s.guest is not None:
                lines += ["   create mask = 0664", "   directory mask = 0775"]
            else:
                lines += ["   create mask = 0660", "   directory mask = 0770"]
        return "\n".join(lines) + "\n"

    def users_file(self) -> tuple[str, tuple[SecretPiece, ...]]:
        """The smbpasswd-format file of NT hashes (markers for the hashes; uid 0 stands for
        the Unix uid, filled in on the server)."""
        lines, pieces = [], []
        for i, u in enumerate(sorted(self.users, key=lambda u: u.name)):
            # LM hash disabled (X...); flags: normal user, password does not expire; a fixed,
            # non-zero last-change time (0 would mean "must change at next logon").
            lines.append(f"{u.name}:0:{'X' * 32}:{SECRET_MARK.format(i)}:[UX         ]:"
                         "LCT-60000000:")
            pieces.append(SecretPiece(u.password, "nt-hash"))
        return "".join(line + "\n" for line in lines), tuple(pieces)

    def contribute(self, env: Env) -> Contribution:
        c = Contribution(packages=["samba"])
        q = shlex.quote
        admins = {a.name for a in env.server.admins}
        for s in sorted(self.shares, key=lambda s: s.name):
            c.commands.append(Command(f"samba: group {s.group} (share {s.name})",
                                      f"groupadd --system {s.group}",
                                      unless=f"getent group {s.group} >/dev/null"))
            c.directories.append(ManagedDir(s.directory, "2775" if s.guest else "2770",
                                            owner="root", group=s.group))
        for u in sorted(self.users, key=lambda u: u.name):
            groups = self._groups_of(u.name)
            if u.name in admins and groups:  # the admin's own account, made in its phase
                c.commands.append(Command(
                    f"samba: admin {u.name} in {', '.join(groups)}",
                    f"usermod -aG {','.join(groups)} {q(u.name)}",
                    unless=" && ".join(f"id -nG {q(u.name)} | grep -qw {g}" for g in groups),
                    after_files=True))
        content, pieces = self.users_file()
        c.files.append(ManagedFile(USERS_FILE, content, mode="0600", secrets=pieces))
        c.files.append(ManagedFile(CONFIG, self.config(env.server.hostname), mode="0644",
                                   validate=VALIDATE))
        c.commands.append(Command(
            "samba: password database (tdbsam) from the model's users",
            # printf is the shell's built-in: the hashes are never a program's argument.
            f"umask 077 && t=$(mktemp -p {PASSDB_DIR}) && "
            f"while IFS=: read -r n _ rest; do printf '%s:%s:%s\\n' \"$n\" \"$(id -u \"$n\")\" "
            f"\"$rest\"; done < {USERS_FILE} > \"$t\" && "
            f"{{ [ ! -s \"$t\" ] || pdbedit -i smbpasswd:\"$t\" >/dev/null; }}; rc=$?; "
            f"rm -f \"$t\"; [ $rc -eq 0 ] && pdbedit -L | cut -d: -f1 | "
            f"while read -r u; do grep -q \"^$u:\" {USERS_FILE} || pdbedit -x -u \"$u\" "
            ">/dev/null || exit 1; done",
            on_change=(USERS_FILE,)))
        c.commands.append(Command(
            "samba: nmbd off (no NetBIOS: SMB3 on port 445 only)",
            "systemctl disable --now nmbd.service >/dev/null 2>&1",
            # Holds only once samba is installed: read before the packages phase of a first
            # deploy, the guard is then tested again after it (nmbd starts with the package).
            unless="dpkg-query -W -f='${Status}' samba 2>/dev/null | grep -q 'ok installed' && "
            "! systemctl is-enabled --quiet nmbd.service 2>/dev/null && "
            "! systemctl is-active --quiet nmbd.service"))
        if env.require_target().in_container:
            container_dropin(c, "samba", "smbd.service",
                             "in a container (see selfhost/services/samba.py).",
                             "TimeoutStopSec=5\n")
        c.units.append(Unit("smbd.service", reload_on=(CONFIG,), reload=False))
        return c
