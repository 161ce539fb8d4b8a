"""The request kinds: what a module may ask of the others.

Each request is an immutable value that carries ``origin``, the model path of what asked for
it (``services.radicale``, ``hardening.ssh``), so that a conflict names both sides and points
at both places in the YAML file. Every kind has exactly one provider module and its own merge
rule (:mod:`selfhost.compose.route`); a module may also provide kinds and request others.

A request never holds a secret: only references (:class:`~selfhost.models.base.SecretRef`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from selfhost.models.base import SecretRef

Proto = Literal["tcp", "udp"]
Zone = Literal["internet", "lan", "vpn"]
"""Where a port accepts connections from: anywhere, the LAN networks, or the VPN."""


@dataclass(frozen=True)
class Request:
    """Base of every request kind."""

    origin: str = field(default="", kw_only=True)
    """Model path of the module (or field) that asked, e.g. ``services.radicale``."""

    shared: ClassVar[bool] = False
    """Whether two modules may ask for the same thing (same key, same content): a system
    user both need. Otherwise a key is one module's (a port, a host name)."""

    def key(self) -> object:
        """Two requests with the same key are about the same thing (a port, a host name): they
        merge when equal and conflict otherwise. ``None``: never conflicts."""
        return None

    def overlaps(self, other: Request) -> bool:
        """Whether two requests with the same key really collide (default: always). A port
        bound to other addresses than another module's does not."""
        return True

    def describe(self) -> str:
        return type(self).__name__


# --------------------------------------------------------------------------- network


@dataclass(frozen=True)
class Port(Request):
    """A port this host listens on and needs open in the firewall, in one zone."""

    port: int
    proto: Proto = "tcp"
    zone: Zone = "internet"
    comment: str = ""
    bind: tuple[str, ...] = ()
    """The addresses the service listens on; empty: every address (0.0.0.0 and ::). Two
    modules may listen on one port when their addresses differ (a LAN resolver and an
    authoritative server on the public address)."""

    def key(self) -> object:
        return ("port", self.port, self.proto)

    def overlaps(self, other: Request) -> bool:
        if not isinstance(other, Port) or not self.bind or not other.bind:
            return True
        return bool(set(self.bind) & set(other.bind))

    def describe(self) -> str:
        where = f" on {', '.join(self.bind)}" if self.bind else ""
        return f"port {self.port}/{self.proto}{where}"


@dataclass(frozen=True)
class ZoneNetwork(Request):
    """A network that belongs to a zone: a VPN module's tunnel network is "the VPN", so that
    services limited to the VPN accept it."""

    zone: Literal["lan", "vpn"]
    network: str

    def describe(self) -> str:
        return f"{self.network} in the {self.zone.upper()} zone"


@dataclass(frozen=True)
class Forward(Request):
    """Routed traffic the firewall lets through: from ``from_zone`` (or an interface) out to
    ``to`` (``internet`` or a zone)."""

    from_interface: str
    to: Literal["internet", "lan", "any"] = "internet"

    def key(self) -> object:
        return ("forward", self.from_interface, self.to)

    def describe(self) -> str:
        return f"forwarding from {self.from_interface} to {self.to}"


@dataclass(frozen=True)
class Masquerade(Request):
    """Source NAT of ``network`` behind this host's address on the way out."""

    network: str

    def key(self) -> object:
        return ("masquerade", self.network)

    def describe(self) -> str:
        return f"masquerade of {self.network}"


@dataclass(frozen=True)
class LoopbackGuard(Request):
    """Only ``users`` may open connections to this host's local TCP ``port`` (an upstream
    that trusts whoever connects, e.g. a service behind a reverse proxy that authenticates)."""

    port: int
    users: tuple[str, ...]

    def key(self) -> object:
        return ("loopback-guard", self.port)

    def describe(self) -> str:
        return f"local port {self.port} for {', '.join(self.users)} only"


# --------------------------------------------------------------------------- system


@dataclass(frozen=True)
class Sysctl(Request):
    """A kernel setting. Priorities settle overrides as in NixOS (lower wins: hardening
    defaults are 1000, services 100, the model's own overrides 50); two different values at
    the winning priority are a conflict. Written with a comment naming the requester."""

    name: str
    value: str
    priority: int = 100

    def describe(self) -> str:
        return f"sysctl {self.name} = {self.value}"


@dataclass(frozen=True)
class SystemUser(Request):
    """A system account (and its group) for a daemon, created with ``useradd --system``."""

    shared: ClassVar[bool] = True

    name: str
    home: str = "/nonexistent"
    groups: tuple[str, ...] = ()
    """Supplementary groups (created if missing)."""

    def key(self) -> object:
        return ("user", self.name)

    def describe(self) -> str:
        return f"system user {self.name}"


@dataclass(frozen=True)
class AbsentPackage(Request):
    """A Debian package that must not be installed (purged if it is)."""

    name: str
    why: str = ""

    def describe(self) -> str:
        return f"package {self.name} absent"


@dataclass(frozen=True)
class Sendmail(Request):
    """"I provide ``/usr/sbin/sendmail`` for the rest of the system" (msmtp, postfix): a role
    that exactly one module may hold. Modules that mail (update reports, backup alerts) ask
    :meth:`selfhost.compose.module.Env.has_sendmail`."""

    package: str
    fallback: bool = False
    """Held only if no other module asks for the role: a relay client (msmtp) steps back
    for a mail server (postfix)."""

    def key(self) -> object:
        return ("sendmail",)

    def describe(self) -> str:
        return f"the sendmail role ({self.package})"


@dataclass(frozen=True)
class MailLimits:
    """Outbound limits of one mail account (``None``: the mail server's own limit)."""

    per_minute: int | None = None
    per_day: int | None = None
    first_time_per_day: int | None = None


@dataclass(frozen=True)
class MailAccount(Request):
    """A mailbox on this host's mail server, asked by another module (an association's
    member): ``address`` (a full address, or a local part in the mail server's first domain)
    logs in with ``password`` (a reference, hashed with bcrypt on the deploying machine) over
    IMAP and submission, stores at most ``quota_mb``, and receives the mail of ``aliases``.
    ``limits`` replace the mail server's outbound limits for this login and for the local Unix
    login ``local_login`` (its ``sendmail``, e.g. PHP's ``mail()``); ``owner`` names who the
    account belongs to in the limit messages. ``aliases_origin``: the model path of the
    aliases, for errors about them. One address is one requester's (two conflict)."""

    address: str
    password: SecretRef
    quota_mb: int = 2048
    owner: str = ""
    aliases: tuple[str, ...] = ()
    aliases_origin: str = ""
    limits: MailLimits | None = None
    local_login: str | None = None

    def key(self) -> object:
        return ("mail-account", self.address.lower())

    def describe(self) -> str:
        return f"mailbox {self.address}"


@dataclass(frozen=True)
class CalendarAccount(Request):
    """A login on this host's calendar and contacts server, asked by another module (an
    association's member): ``name`` logs in with ``password`` (a reference, hashed with bcrypt
    on the deploying machine) and gets its own collections; ``owner`` names who it belongs to.
    One login name is one requester's (two conflict)."""

    name: str
    password: SecretRef
    owner: str = ""

    def key(self) -> object:
        return ("calendar-account", self.name)

    def describe(self) -> str:
        return f"calendar login {self.name}"


# --------------------------------------------------------------------------- web


@dataclass(frozen=True)
class BasicAuthUser:
    """A login for HTTP basic authentication: its password is a reference, hashed (bcrypt) on
    the deploying machine."""

    name: str
    password: SecretRef


@dataclass(frozen=True)
class TrafficWatch:
    """What the web server watches in a virtual host's access log: a client sending more
    than ``post_max`` POST requests within ``post_seconds`` is banned (fail2ban; 0: no
    limit); more than ``requests_per_minute`` requests or ``mb_per_minute`` MB served in
    one minute alert the admins (0: not watched)."""

    post_max: int = 0
    post_seconds: int = 60
    requests_per_minute: int = 0
    mb_per_minute: int = 0


@dataclass(frozen=True)
class VirtualHost(Request):
    """An HTTPS virtual host of the web server: static files from ``root``, or a reverse proxy
    to ``upstream`` (``127.0.0.1:PORT``, a local service only). With ``root`` and
    ``php_fastcgi``, the ``.php`` files under ``root`` are run by the PHP FastCGI server
    listening on that Unix socket (a PHP-FPM pool), the others served as static files."""

    host: str
    """Fully qualified host name."""
    root: str | None = None
    upstream: str | None = None
    php_fastcgi: str | None = None
    """Path of the Unix socket of a PHP FastCGI server for the ``.php`` files of ``root``."""
    auth: tuple[BasicAuthUser, ...] = ()
    """With users: HTTP basic authentication in front of everything (failed logins are
    logged for fail2ban); the authenticated user is passed upstream in ``X-Remote-User``."""
    zone: Zone = "internet"
    headers: tuple[tuple[str, str], ...] = ()
    """Extra response headers (name, value)."""
    max_body_mb: int = 0
    """Largest request body accepted (0: the web server's default)."""
    watch: TrafficWatch | None = None
    """POST rate limit and traffic spike alerts, from the access log (none: not watched)."""

    def key(self) -> object:
        return ("vhost", self.host)

    def describe(self) -> str:
        return f"virtual host {self.host}"


@dataclass(frozen=True)
class Certificate(Request):
    """A TLS certificate for ``names``, obtained and renewed by the web server (ACME for public
    names, its internal CA for private ones), exported as PEM files readable by ``group``
    (``/etc/selfhost/tls/<first name>/{fullchain,privkey}.pem``); the ``reload`` units are
    reloaded when it is renewed."""

    names: tuple[str, ...]
    group: str = "root"
    reload: tuple[str, ...] = ()

    def key(self) -> object:
        return ("certificate", self.names[0])

    def describe(self) -> str:
        return f"certificate for {', '.join(self.names)}"


# --------------------------------------------------------------------------- mail

ListPosting = Literal["members", "moderated", "open"]
"""Who may post to a list: its members (others per ``ListNonmembers``), its members with
every post held for a moderator, or anyone."""
ListNonmembers = Literal["hold", "reject", "discard"]
"""What happens to a post from a non-member: held for the owners, refused, or dropped."""
ListSubscription = Literal["confirm", "moderate", "confirm_then_moderate", "open"]
"""How a subscription by mail is accepted: the address confirms it (a reply to a mailed
token), an owner approves it, both, or at once."""
ListArchive = Literal["private", "never"]
"""Posts kept in the list's archive on the server, readable by the admin only, or not kept."""


@dataclass(frozen=True)
class MailingList(Request):
    """A mailing list ``address`` (in one of the mail domains) with its ``owners`` and
    policies, run by the host's list manager."""

    address: str
    owners: tuple[str, ...]
    posting: ListPosting = "members"
    nonmembers: ListNonmembers = "hold"
    subscription: ListSubscription = "confirm"
    archive: ListArchive = "private"
    description: str = ""

    def key(self) -> object:
        return ("mailing-list", self.address)

    def describe(self) -> str:
        return f"mailing list {self.address}"


@dataclass(frozen=True)
class ListAddresses(Request):
    """Of the mail server: hand mail for ``addresses`` (a list's address and its command
    addresses, ``list-request@...``) to a list manager over LMTP at ``lmtp``
    (``127.0.0.1:PORT``), and take the list manager's outgoing mail on a loopback port,
    ``submit_port``, that only ``user`` (and root) may connect to, counted per envelope sender
    like any other outgoing mail."""

    list_address: str
    addresses: tuple[str, ...]
    lmtp: str
    submit_port: int
    user: str

    def key(self) -> object:
        return ("list-addresses", self.list_address)

    def describe(self) -> str:
        return f"mail routing of list {self.list_address}"


# --------------------------------------------------------------------------- data, DNS, logs


@dataclass(frozen=True)
class BackupSource(Request):
    """Data to back up, with how to make it consistent first: a ``before`` command (a dump)
    and units stopped for the duration of the backup."""

    path: str
    before: str | None = None
    stop_units: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"backup of {self.path}"


@dataclass(frozen=True)
class DnsRecord(Request):
    """A DNS record to publish: ``selfhost dns`` prints them as zone-file lines, ``selfhost
    plan`` lists them (a DNS module may serve them). ``name`` is absolute (no final dot);
    ``value`` is the record data in zone-file syntax (names in it end with a dot).

    ``from_host``, when given, is a shell command whose output on the host is the real value
    (a key generated there, e.g. DKIM); ``value`` is then what is printed when the host cannot
    be read, and ``note`` says why (both shown as a comment)."""

    name: str
    type: Literal["A", "AAAA", "CNAME", "MX", "TXT", "SRV", "CAA", "TLSA"]
    value: str
    note: str = ""
    from_host: str | None = None

    def key(self) -> object:
        return ("dns-cname", self.name) if self.type == "CNAME" else None

    def describe(self) -> str:
        return f"DNS {self.name} {self.type}"


def txt_data(value: str) -> str:
    """TXT record data for :class:`DnsRecord`: ``value`` quoted, as strings of at most 255
    characters each (RFC 1035), quotes and backslashes escaped."""
    chunks = [value[i:i + 255] for i in range(0, len(value), 255)] or [""]
    return " ".join('"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks)


@dataclass(frozen=True)
class Jail(Request):
    """A fail2ban jail. ``filter_definition``, when given, is written as the jail's own filter
    (``/etc/fail2ban/filter.d/<filter>.conf``)."""

    name: str
    port: str
    filter: str | None = None
    logpath: str | None = None
    journalmatch: str | None = None
    maxretry: int | None = None
    findtime: int | None = None
    """Seconds in which ``maxretry`` matches ban (default: the hardening's window)."""
    filter_definition: str | None = None

    def key(self) -> object:
        return ("jail", self.name)

    def describe(self) -> str:
        return f"fail2ban jail {self.name}"


@dataclass(frozen=True)
class HealthCheck(Request):
    """Something ``selfhost check`` verifies on the running host: a unit active, a TCP port
    answering, an HTTPS URL answering with a status, a certificate valid long enough, a
    backup repository's last success younger than its policy allows (``backup``: ``target``
    the repository's name, ``expect`` the largest age in hours; the daily on-host check
    verifies it too), a mail queue that drains (``mailqueue``: ``target`` "postfix",
    ``expect`` how many messages may wait more than an hour in its deferred queue)."""

    kind: Literal["unit", "tcp", "https", "certificate", "backup", "mailqueue"]
    target: str
    expect: str = ""

    def describe(self) -> str:
        return f"health check {self.kind} {self.target}"


MAILQUEUE_OLD = ("find /var/spool/postfix/deferred -type f -mmin +60 2>/dev/null | wc -l")
"""Shell: how many messages have waited more than an hour in Postfix's deferred queue."""


# --------------------------------------------------------------------------- fleet


@dataclass(frozen=True)
class PeerBackupAccount(Request):
    """Addressed to another host of the fleet (``on_host``): keep ``client``'s sftp restic
    repository ``repo`` in a chrooted, key-only account. The public key is the controller's
    key-store entry ``key_name`` (generated on first use, known at plan time)."""

    on_host: str
    client: str
    repo: str
    key_name: str

    def describe(self) -> str:
        return f"backup account for {self.client} on {self.on_host}"


@dataclass(frozen=True)
class DnsZone(Request):
    """Serve ``zone`` as its primary on this host, NOTIFYing and allowing transfers to the
    ``secondaries`` (name -> addresses), signed with DNSSEC when ``dnssec``."""

    zone: str
    secondaries: tuple[tuple[str, tuple[str, ...]], ...] = ()
    dnssec: bool = True
    ns: tuple[str, ...] = ()
    """The zone's name servers (this host first)."""

    def key(self) -> object:
        return ("dns-zone", self.zone)

    def describe(self) -> str:
        return f"DNS zone {self.zone}"


@dataclass(frozen=True)
class DnsSecondary(Request):
    """Addressed to another host of the fleet (``on_host``): transfer ``zone`` from
    ``primary`` (its addresses) and serve it."""

    on_host: str
    zone: str
    primary: str
    addresses: tuple[str, ...]

    def key(self) -> object:
        return ("dns-zone", self.zone, self.on_host)

    def describe(self) -> str:
        return f"secondary DNS for {self.zone} on {self.on_host}"


@dataclass(frozen=True)
class BackupMx(Request):
    """Addressed to another host of the fleet (``on_host``): be a backup MX of ``domains``,
    accepting mail only for ``recipients`` (addresses; ``@domain`` for a domain with a
    catch-all), queueing it up to ``queue_days`` and handing it to ``primary`` (the primary
    MX's host name) on port 25. ``reject_senders``: the domains whose mail never comes from
    outside (the primary refuses them on port 25, so the backup refuses them too rather than
    bounce them later)."""

    on_host: str
    primary: str
    domains: tuple[str, ...]
    recipients: tuple[str, ...]
    reject_senders: tuple[str, ...] = ()
    queue_days: int = 10
    max_message_mb: int = 25

    def key(self) -> object:
        return ("backup-mx", self.on_host, self.primary)

    def describe(self) -> str:
        return f"backup MX of {', '.join(self.domains)} on {self.on_host}"


@dataclass(frozen=True)
class WireGuardTunnel(Request):
    """Addressed to another host of the fleet (``on_host``): be the other end of a WireGuard
    tunnel that ``peer`` (the host that declares it) runs on interface ``interface`` and UDP
    ``port`` on both ends. ``address`` is this end's tunnel address (with the network's
    prefix), ``peer_address`` the other end's; ``peer_endpoint`` where to reach the peer
    (``host:port``; empty: only the peer connects). Both ends' X25519 key pairs are entries of
    the controller's key store (``key_name``: this end's, uploaded as a secret; its public
    key and ``peer_key_name``'s are known at plan time). ``vpn_zone``: the tunnel's network
    counts as the VPN zone here."""

    on_host: str
    peer: str
    interface: str
    port: int
    address: str
    peer_address: str
    peer_endpoint: str
    key_name: str
    peer_key_name: str
    keepalive: int = 25
    vpn_zone: bool = True

    def key(self) -> object:
        return ("wireguard-tunnel", self.on_host, self.interface)

    def describe(self) -> str:
        return f"WireGuard tunnel {self.interface} from {self.peer} on {self.on_host}"


CROSS_HOST: tuple[type[Request], ...] = (PeerBackupAccount, DnsSecondary, BackupMx,
                                         WireGuardTunnel)
"""Kinds addressed to another host of the fleet (their ``on_host``)."""
