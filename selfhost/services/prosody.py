"""Instant messaging: Prosody (Debian's package), an XMPP server for the family or the
association, with group chats (MUC) and file sharing.

Accounts come from the model only (no in-band registration, no password change from a
client: the model is the truth). Their passwords are references; the server never sees
them. Prosody's ``internal_hashed`` store keeps, per account, a salt, an iteration count and
two SCRAM-SHA-1 keys (``stored_key``, ``server_key``), never the password, and reads that
file again at every login. So the deploying machine computes those keys (PBKDF2, 10000
iterations: Prosody's default) with a salt derived from the password and the account (an HMAC
keyed with the controller's salt key, as for the web logins' bcrypt hashes): the same password
gives the same keys on every deploy, a second deploy changes nothing, and two accounts never
share a salt. The keys go, in a root-only list, to a small script that writes the account files
in Prosody's own format and removes the accounts of a managed domain that the model no longer
lists (their other data stays). Why not ``prosodyctl register``/``passwd``: the first takes the
password on its command line, and neither can tell whether a password is already the right one,
so a re-deploy would change every account every time. The script runs when the list changes
and whenever an account file drifted (a restore, a hand edit).

TLS: the module requests a certificate per XMPP domain from the web server (its ACME or
internal CA; exported to ``/etc/selfhost/tls/NAME/``, Prosody reloaded on renewal). Clients
connect on 5222 and must start TLS before anything else (``c2s_require_encryption``); SASL
PLAIN is only offered inside TLS. Federation (server-to-server on 5269) is off by default: a
home server's accounts talk to each other, and opening 5269 to every server of the internet
brings spam and abuse for no gain until someone asks for it; it also needs a public domain,
since remote servers only trust certificates of public CAs (the model refuses federation of a
private domain such as ``home.arpa``).

Group chats: a MUC component ``conference.DOMAIN`` per domain, where only local accounts may
create rooms. File sharing: ``mod_http_file_share`` as ``upload.DOMAIN`` with a size limit,
its HTTP side on 127.0.0.1:5280 behind the web server's HTTPS virtual host of the same name
(one HTTPS port and one certificate store for the whole server, Caddy's request-size limit in
front of Prosody's). The data directory is backed up with Prosody stopped for the duration (its
message archives are appended in place, a copy taken mid-write could be cut). Failed logins
are logged with the client's address by ``mod_log_auth`` (Debian's ``prosody-modules``) to the
journal, and a fail2ban jail reads them.

Debian 12 ships Prosody 0.12, Debian 13 ships 13.0: the configuration is the same but for the
modules, rendered per release (13.0 warns that ``mod_posix`` is deprecated, and adds
``account_activity`` and, for federated servers, push notifications).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from selfhost.compose.module import Contribution, Env, Problem
from selfhost.compose.requests import (
    BackupSource,
    Certificate,
    DnsRecord,
    HealthCheck,
    Jail,
    Port,
    Request,
    VirtualHost,
)
from selfhost.compose.resources import (
    SECRET_MARK,
    Command,
    ManagedDir,
    ManagedFile,
    SecretPiece,
    Unit,
)
from selfhost.models.base import SecretRef, StrictModel
from selfhost.services.base import Service

CONFIG = "/etc/prosody/prosody.cfg.lua"
ACCOUNTS = "/etc/prosody/selfhost-accounts.txt"
ACCOUNTS_SCRIPT = "/usr/local/lib/selfhost/prosody-accounts"
DATA = "/var/lib/prosody"
TLS_DIR = "/etc/selfhost/tls"
C2S_PORT = 5222
S2S_PORT = 5269
HTTP_PORT = 5280
JAIL_FILTER = "selfhost-prosody-auth"

_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_DOMAIN = re.compile(rf"^{_LABEL}(\.{_LABEL})+$")
_LOCAL = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_SPECIAL_USE = ("home.arpa", "lan", "local", "internal", "test", "example", "invalid",
                "localhost", "localdomain", "home", "corp")
"""Names that are never in public DNS (RFC 6761, RFC 8375 and common LAN suffixes)."""

# Debian's default modules (its prosody.cfg.lua of each release) minus what accounts from the
# model rule out: register, invites*.
_MODULES = ("disco", "roster", "saslauth", "tls", "blocklist", "bookmarks", "carbons", "limits",
            "pep", "private", "smacks", "vcard4", "vcard_legacy", "csi_simple", "ping", "time",
            "uptime", "version", "admin_shell", "mam", "log_auth")


def data_dir(host: str) -> str:
    """Prosody's directory of a host in its internal storage (``util.datamanager``: every
    character but letters and digits as %xx)."""
    return f"{DATA}/{_encode(host)}"


def _encode(s: str) -> str:
    return "".join(c if c.isascii() and c.isalnum() else f"%{ord(c):02x}" for c in s)


def _lua(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


class XmppAccount(StrictModel):
    """An XMPP account (a JID), e.g. ``alice@home.arpa``."""

    jid: str = Field(description="The account's address, name@domain: the name of a-z, 0-9, "
                     "'.', '_', '-', the domain one of the service's domains.")
    password: SecretRef = Field(
        description="Where the password is kept on the deploying machine ({env: VAR} or "
        "{file: PATH}); only SCRAM-SHA-1 keys derived from it reach the server.")

    @field_validator("jid")
    @classmethod
    def _jid(cls, v: str) -> str:
        local, at, domain = v.partition("@")
        if not at or not _LOCAL.match(local) or not _DOMAIN.match(domain):
            raise ValueError(f"{v!r} is not a JID of the form name@domain (name: 1-64 of "
                             "a-z 0-9 . _ - starting with a letter or digit; domain: a "
                             "lower-case DNS name)")
        return v

    @property
    def local(self) -> str:
        return self.jid.partition("@")[0]

    @property
    def domain(self) -> str:
        return self.jid.partition("@")[2]


class XmppService(Service):
    """Prosody: XMPP accounts, group chats and file sharing, over TLS."""

    kind: ClassVar[str] = "xmpp"
    uses: ClassVar[tuple[type[Request], ...]] = (Port, Certificate, VirtualHost, DnsRecord,
                                                 BackupSource, Jail, HealthCheck)

    domains: list[str] = Field(
        default_factory=list,
        description="The XMPP domains (the part after @ in addresses); empty: the server's "
        "domain. With ACME certificates, each must resolve to this server.")
    accounts: list[XmppAccount] = Field(min_length=1, description="Who may log in.")
    zone: Literal["internet", "lan", "vpn"] = Field(
        default="internet",
        description="Where clients connect from: 'internet', or only the 'lan' or the 'vpn' "
        "(also limits the file-sharing host).")
    federation: bool = Field(
        default=False,
        description="Talk to other XMPP servers (server-to-server on port 5269, open to the "
        "internet). Needs public domains with publicly trusted certificates.")
    muc: bool = Field(default=True, description="Group chats on conference.DOMAIN (rooms "
                      "created by local accounts only).")
    upload_max_mb: int = Field(
        default=10, ge=0, le=1024,
        description="Largest file a client may share (MB) through upload.DOMAIN; 0: no file "
        "sharing.")
    upload_expire_days: int = Field(default=7, ge=1, le=365,
                                    description="Shared files are deleted after this many days.")
    archive_expire_days: int = Field(
        default=7, ge=1, le=3650,
        description="Message archives (history synchronised between a user's devices) are "
        "kept this many days.")

    @field_validator("domains")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        out = [d.lower().rstrip(".") for d in v]
        for d in out:
            if not _DOMAIN.match(d):
                raise ValueError(f"{d!r} is not a DNS name")
        dup = sorted({d for d in out if out.count(d) > 1})
        if dup:
            raise ValueError(f"domains listed twice: {', '.join(dup)}")
        return out

    @model_validator(mode="after")
    def _hosts(self) -> XmppService:
        domains = set(self.domains)
        for d in self.domains:
            for sub in self.components(d):
                if sub in domains:
                    raise ValueError(f"{sub} is both a domain and a component of {d}")
        return self

    def xmpp_domains(self, env: Env) -> list[str]:
        return list(self.domains) or [env.server.domain]

    def components(self, domain: str) -> list[str]:
        out = []
        if self.muc:
            out.append(f"conference.{domain}")
        if self.upload_max_mb:
            out.append(f"upload.{domain}")
        return out

    def assertions(self, env: Env) -> list[Problem]:
        out: list[Problem] = []
        domains = self.xmpp_domains(env)
        seen: dict[str, int] = {}
        for i, a in enumerate(self.accounts):
            loc: tuple[str | int, ...] = ("services", "xmpp", "accounts", i, "jid")
            if a.domain not in domains:
                out.append(Problem(loc, f"{a.jid}: {a.domain} is not one of the XMPP domains "
                                   f"({', '.join(domains)})"))
            if a.jid in seen:
                out.append(Problem(loc, f"{a.jid} is listed twice",
                                   other=("services", "xmpp", "accounts", seen[a.jid], "jid")))
            else:
                seen[a.jid] = i
        if self.federation:
            for d in domains:
                if any(d == s or d.endswith("." + s) for s in _SPECIAL_USE):
                    out.append(Problem(("services", "xmpp", "federation"),
                                       f"federation needs public domains: {d} is not in public "
                                       "DNS and remote servers do not trust its certificate"))
        return out

    def requests(self, env: Env) -> list[Request]:
        fqdn = env.server.fqdn
        out: list[Request] = [Port(C2S_PORT, "tcp", self.zone, comment="XMPP clients")]
        if self.federation:
            out.append(Port(S2S_PORT, "tcp", "internet", comment="XMPP servers"))
        for d in self.xmpp_domains(env):
            # Clients check the domain's certificate; remote servers also the components'.
            names = [d, *self.components(d)] if self.federation else [d]
            out += [Certificate((n,), group="prosody", reload=("prosody.service",))
                    for n in names]
            out.append(DnsRecord(f"_xmpp-client._tcp.{d}", "SRV", f"0 5 {C2S_PORT} {fqdn}."))
            if self.federation:
                out.append(DnsRecord(f"_xmpp-server._tcp.{d}", "SRV",
                                     f"0 5 {S2S_PORT} {fqdn}."))
                if self.muc:
                    out.append(DnsRecord(f"conference.{d}", "CNAME", f"{fqdn}."))
            if self.upload_max_mb:
                out.append(VirtualHost(f"upload.{d}", upstream=f"127.0.0.1:{HTTP_PORT}",
                                       zone=self.zone, max_body_mb=self.upload_max_mb,
                                       origin=f"{env.path}.upload_max_mb"))
        out += [
            BackupSource(DATA, stop_units=("prosody.service",)),
            Jail("prosody", port=str(C2S_PORT), filter=JAIL_FILTER,
                 journalmatch="_SYSTEMD_UNIT=prosody.service", filter_definition=AUTH_FILTER),
            HealthCheck("unit", "prosody.service"),
            HealthCheck("tcp", f"127.0.0.1:{C2S_PORT}"),
        ]
        return out

    def modules(self, release: str) -> list[str]:
        mods = list(_MODULES)
        if self.federation:
            mods.append("dialback")
        if release == "bookworm":
            mods.append("posix")  # 13.0 does its job itself and warns that it is deprecated
        else:
            mods.append("account_activity")
            if self.federation:
                mods.append("cloud_notify")  # push services are remote servers
        return mods

    def config(self, env: Env, release: str) -> str:
        """``prosody.cfg.lua`` for Prosody 0.12 (bookworm) or 13.0 (trixie)."""
        lines = [
            "-- Managed by selfhost: changes here are overwritten on the next deploy.",
            f"-- Prosody {'0.12 (Debian 12)' if release == 'bookworm' else '13.0 (Debian 13)'}.",
            'pidfile = "/run/prosody/prosody.pid"',
            "admins = { }",
            "modules_enabled = {",
            *(f"\t{_lua(m)};" for m in self.modules(release)),
            "}",
            # s2s is loaded by default; off, no server-to-server port is opened.
            "modules_disabled = { " + ("" if self.federation else '"s2s"; ') + "}",
            "-- Accounts come from the model only.",
            "allow_registration = false",
            'authentication = "internal_hashed"',
            'storage = "internal"',
            "",
            "-- Clients must start TLS first; PLAIN is offered inside TLS only.",
            "c2s_require_encryption = true",
            f"c2s_ports = {{ {C2S_PORT} }}",
            "c2s_direct_tls_ports = { }",
            "s2s_require_encryption = true",
            "s2s_secure_auth = true",
        ]
        if self.federation:
            lines.append(f"s2s_ports = {{ {S2S_PORT} }}")
        lines += [
            "limits = {",
            '\tc2s = { rate = "10kb/s"; };',
            '\ts2sin = { rate = "30kb/s"; };',
            "}",
            "",
            "-- HTTP (file sharing) on the loopback only, behind the web server's HTTPS.",
            f"http_ports = {{ {HTTP_PORT} }}",
            'http_interfaces = { "127.0.0.1" }',
            "https_ports = { }",
            "",
            f'archive_expires_after = "{self.archive_expire_days}d"',
            "-- To the journal (journalctl -u prosody), where fail2ban reads failed logins.",
            'log = { { levels = { min = "info" }; to = "stdout"; timestamps = false; } }',
            'log_auth_ips = "failure"',
            "",
        ]
        for d in self.xmpp_domains(env):
            lines += [f"VirtualHost {_lua(d)}", *self._tls(d)]
            if self.muc:
                lines += [f'Component "conference.{d}" "muc"',
                          '\trestrict_room_creation = "local"',
                          '\tmodules_enabled = { "muc_mam" }']
                if self.federation:
                    lines += self._tls(f"conference.{d}")
            if self.upload_max_mb:
                lines += [f'Component "upload.{d}" "http_file_share"',
                          f'\thttp_external_url = "https://upload.{d}/"',
                          f"\thttp_file_share_size_limit = {self.upload_max_mb * 1_000_000}",
                          f"\thttp_file_share_expires_after = {self.upload_expire_days * 86400}"]
                if self.federation:
                    lines += self._tls(f"upload.{d}")
            lines.append("")
        return "\n".join(lines)

    @staticmethod
    def _tls(host: str) -> list[str]:
        return [f'\tssl = {{ certificate = "{TLS_DIR}/{host}/fullchain.pem"; '
                f'key = "{TLS_DIR}/{host}/privkey.pem"; }}']

    def accounts_list(self, env: Env) -> tuple[str, tuple[SecretPiece, ...]]:
        """The root-only list the accounts script reads, with markers for the SCRAM keys."""
        lines = ["# Managed by selfhost: Prosody's accounts from the model (SCRAM-SHA-1 keys, "
                 "never a password),",
                 f"# made into account files by {ACCOUNTS_SCRIPT}."]
        secrets: list[SecretPiece] = []
        for d in self.xmpp_domains(env):
            lines.append(f"domain\t{data_dir(d)}/accounts")
        for a in sorted(self.accounts, key=lambda a: a.jid):
            path = f"{data_dir(a.domain)}/accounts/{_encode(a.local)}.dat"
            lines.append(f"account\t{path}\t{SECRET_MARK.format(len(secrets))}")
            secrets.append(SecretPiece(a.password, "scram-sha-1", context=f"xmpp/{env.server.fqdn}/{a.jid}"))
        return "\n".join(lines) + "\n", tuple(secrets)

    def contribute(self, env: Env) -> Contribution:
        release = env.require_target().release
        c = Contribution(packages=["prosody", "prosody-modules"])
        tmp = "t=$(mktemp --suffix=.cfg.lua)"
        # prosodyctl wants a name ending in .cfg.lua that the prosody user can read.
        c.files.append(ManagedFile(
            CONFIG, self.config(env, release), mode="0640", group="prosody",
            validate=f"{tmp} && install -m 0640 -g prosody {{path}} \"$t\" && "
            "prosodyctl --config \"$t\" check config; rc=$?; rm -f \"$t\"; exit $rc"))
        text, secrets = self.accounts_list(env)
        c.files.append(ManagedFile(ACCOUNTS, text, mode="0600", secrets=secrets))
        c.directories.append(ManagedDir("/usr/local/lib/selfhost", "0755"))
        c.files.append(ManagedFile(ACCOUNTS_SCRIPT, ACCOUNTS_SH, mode="0755",
                                   validate="bash -n {path}"))
        run = shlex.quote(ACCOUNTS_SCRIPT)
        c.commands.append(Command("prosody: account files from the model (the list changed)",
                                  run, on_change=(ACCOUNTS, ACCOUNTS_SCRIPT)))
        c.commands.append(Command("prosody: account files match the model", run,
                                  unless=f"{run} --check", after_files=True))
        c.units.append(Unit("prosody.service", reload_on=(CONFIG,), reload=False))
        return c


ACCOUNTS_SH = (Path(__file__).parent / "prosody-accounts.sh").read_text(encoding="utf-8")

AUTH_FILTER = r"""# Managed by selfhost: failed XMPP logins, as mod_log_auth logs them to the journal.
# The client's address ends the line (the user name before it is the client's).
[INCLUDES]
before = common.conf

[Definition]
_daemon = prosody
""" + (r"failregex = ^%(__prefix_line)s\S+\s+info\s+Failed authentication attempt "
       r"\(not-authorized\) for user .* from IP: <HOST>$" "\n")
