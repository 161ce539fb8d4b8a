"""Association hosting: the members of a non-profit, each with their own web sites (static or
PHP) and MariaDB databases, isolated from each other on one Debian server.

What a member gets, and how it is kept apart from the others:

- **One Unix user per member** (requested of the system module like any daemon's user: a
  system account without a login shell; SSH only lets the admins in). Its home
  ``/srv/members/NAME`` is ``0750 NAME:caddy``: the member and the web server may enter it,
  no other member can. Sites live in ``/srv/members/NAME/sites/DOMAIN``; PHP's temporary and
  upload files in ``/srv/members/NAME/tmp`` (``0700``), its error log in ``.../logs``.
- **One PHP-FPM pool per member** (Debian's ``php-fpm``), running as the member's user, on its
  own socket ``/run/php/selfhost-NAME.sock`` that only Caddy's group may open, with
  ``open_basedir`` limited to the member's home, its own temporary directories, the dangerous
  functions disabled (``exec``, ``system``, ``proc_open``, ... and ``mail`` unless the host
  has the mail service, see below) and the plan's limits (``pm.max_children``, ``memory_limit``,
  ``max_execution_time``, upload size). Debian's default ``www`` pool is switched off, and
  OPcache checks file permissions and roots (a member's cached scripts are not another's).
  Every pool file is checked by ``php-fpmX.Y -t`` on the server before it is installed;
  the pools are reloaded gracefully.
- **Caddy virtual hosts** for the sites, requested of the web module (a ``VirtualHost`` with a
  ``root`` and, for PHP sites, ``php_fastcgi`` to the member's socket), so they get HTTPS,
  a DNS record, a health check and an access log each like any other host name.
- **MariaDB** (Debian's ``mariadb-server``, listening on 127.0.0.1 only, ``LOCAL INFILE``
  off): one database user per member (``NAME@localhost``) with every right on its own
  databases and none elsewhere. Its password is a reference (``{env: ...}``/``{file: ...}``):
  only the ``mysql_native_password`` hash reaches the server. Databases and rights are
  applied by a root-only SQL file whenever it changes; a member's rights are revoked and
  granted again from the model each time, so a database taken off a member is no longer
  theirs. Nothing is ever dropped: a member or database removed from the model keeps its data.
- **Backups**: each member's home is a backup source of its own (restore one member without
  touching the others); a pre-backup hook dumps every member database to
  ``/var/backups/selfhost/mariadb/MEMBER/DB.sql`` (``--single-transaction``: consistent
  without stopping anything).

- **Mailboxes** (on a host with the mail service): a member lists ``mailboxes`` and
  ``aliases`` (to its first mailbox); the module asks the mail module for each mailbox with a
  :class:`~selfhost.compose.requests.MailAccount` request (the plan's ``mail_quota_mb`` and,
  when the plan sets them, its outbound limits for the mailbox's login and for the member's
  Unix user's ``sendmail``). The mail module validates the addresses at the member's model
  path, merges them with its own mailboxes (one passwd-file, one quota mechanism, one set
  of Postfix maps and postfwd rules) and backs each member's Maildir up as a source of the
  member's (``/var/vmail/DOMAIN/LOCAL``). Maildirs belong to Dovecot's ``vmail`` user
  (``/var/vmail`` is ``0750``): no member's Unix user, nor their PHP, can open another's mail.

**The single login: the model is the directory.** Each member has one ``password`` (a
reference, like every secret). It is hashed with bcrypt on the deploying machine and written
into the mail server's Dovecot passwd-file, once per mailbox (the login is the mailbox's
address), which Dovecot uses for IMAP, POP3 and ManageSieve and answers Postfix's SASL
logins with (submission, so also posting to a mailing list by mail). Chosen over OpenLDAP's
``slapd`` from Debian: for a few hundred members the model already *is* the list of people
and their rights; ``slapd`` would add a daemon to run, harden, monitor and back up, a schema
and ACLs to get right, a replication or restore story, and a second source of truth that a
volunteer could edit by hand and that the next deploy would then contradict. A generated
file has no runtime dependency (a login works while any other service is down), is checked
by the service that reads it, and changes only through a reviewed model. Its cost: a new
password takes a deploy, and a member cannot change it alone (the admin changes the
reference's value). Another service that offers the member a login (calendars, files) gets
the same reference and hashes it the same way, through a request of its own module.

Plans (``plans``) name the defaults so that 200 members stay readable: whether PHP is allowed,
how many PHP workers, memory and time a member's scripts get, how many databases.

**Limits.** Each PHP member's pool runs in a PHP-FPM master of its own
(``selfhost-php@MEMBER.service``, a template unit, configuration
``/etc/selfhost/php-fpm/MEMBER.conf``: ``[global]`` and the pool) in the member's slice
``selfhost-members-MEMBER.slice`` (``-`` escaped as ``\x2d``), which carries the plan's
``MemoryMax``, ``CPUQuota`` and ``TasksMax``. Debian's shared ``php-fpmX.Y`` service is
masked (it would have no pool), pool files of the first layout in its ``pool.d`` are removed,
and the masters, configurations and slices of members no longer on PHP are stopped and
removed. A plan's ``disk_mb`` is a user quota on the file system holding ``/srv/members``,
set only where that file system has user quotas on; elsewhere the deploy says so once
(``/var/lib/selfhost/association-quota`` remembers it was said) and validation warns.

**The calendar login.** On a host with the calendars service (``services.radicale``), each
member with a ``password`` gets a login on Radicale (CalDAV/CardDAV): the module asks the
radicale module for it with a :class:`~selfhost.compose.requests.CalendarAccount` (the login
name is the member's name, the password the same reference as the mailboxes'), which puts it
in the web server's basic auth next to Radicale's own users, hashed with bcrypt on the
deploying machine like the others. Radicale's ``owner_only`` rights keep each member to their
own collections. A member named like one of Radicale's own users is an error at the member's
name.

**Mailing lists.** A member's ``lists`` are asked of the lists module (Mailman 3 core, see
``selfhost/services/mailman.py``) with :class:`~selfhost.compose.requests.MailingList`
requests: members subscribe and post by mail with their mailbox login, archives are private,
and the lists' outgoing mail is counted and held like every other local sender's.

**How mail plugs in.** PHP's ``mail()`` is the hole through which a hacked member form
gets the whole server blacklisted: the pickup path that SMTP policy services never see. On a
host without the mail service, ``mail`` stays in ``disable_functions`` (``sendmail_path =
/bin/false``). On a host with it, the mail module counts every local login's ``sendmail``
per sender and pins that sender to the login (``local_login_sender_maps``: the member's
user can only send as ``MEMBER@server``), holding the member's mail past the limits and
alerting the admin: so the pools allow ``mail()`` (``sendmail_path = /usr/sbin/sendmail -t
-i``, run as the member's user) with ``mail.add_x_header`` on, which names the script in
an ``X-PHP-Originating-Script`` header that the alert and ``selfhost held`` show (only the
file's base name: PHP's ``mail.log``, sent to syslog, gives the full path, from which the
alert names the member's site). No
per-member SMTP credentials are needed, and the other members' mail keeps flowing when one
member's form is abused.

**Watching the sites.** Each member site's virtual host carries the plan's traffic watch:
the web module bans a client over ``post_per_minute`` POSTs (fail2ban over Caddy's access
log) and alerts the admins on request or bandwidth spikes.
"""

from __future__ import annotations

import re
import shlex
from typing import ClassVar

from pydantic import Field, field_validator

from selfhost.compose.module import Contribution, Env, Problem
from selfhost.compose.requests import (
    BackupSource,
    CalendarAccount,
    HealthCheck,
    ListArchive,
    ListNonmembers,
    ListPosting,
    ListSubscription,
    MailAccount,
    MailingList,
    MailLimits,
    Request,
    SystemUser,
    TrafficWatch,
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

HOMES = "/srv/members"
PHP_VERSIONS = {"bookworm": "8.2", "trixie": "8.4"}
"""Debian's PHP of each release (the ``php-fpm`` package depends on it)."""
MARIADB_CNF = "/etc/mysql/mariadb.conf.d/90-selfhost.cnf"
SQL = "/etc/selfhost/mariadb/members.sql"
DUMP_LIST = "/etc/selfhost/mariadb/databases.tsv"
DUMP_SCRIPT = "/usr/local/lib/selfhost/mariadb-dump"
DUMP = "/var/backups/selfhost/mariadb"
FPM_DIR = "/etc/selfhost/php-fpm"
UNIT_DIR = "/etc/systemd/system"
FPM_TEMPLATE = "selfhost-php@.service"
QUOTA_STATE = "/var/lib/selfhost/association-quota"
"""What the disk-quota command last saw where the file system has no user quotas (so a second
deploy does not report it again)."""
SERVICE_USERS = {
    "mysql", "caddy", "radicale", "prosody", "vmail", "knot", "unbound", "opendkim", "rspamd",
    "_rspamd", "redis", "clamav", "debian-exim", "postgres", "samba", "polkitd", "systemd",
    "tss", "uuidd", "statd", "dnsmasq", "avahi", "syslog", "monit", "fail2ban", "php", "root",
}
"""Accounts of Debian's daemons (besides the admin reserved list): never a member's name."""
DISABLED_FUNCTIONS = (
    "exec", "passthru", "shell_exec", "system", "proc_open", "popen", "pcntl_exec",
    "pcntl_fork", "pcntl_signal", "pcntl_alarm", "dl", "putenv", "proc_nice", "mail",
    "opcache_get_status", "opcache_get_configuration",
)
RESERVED_DATABASES = {"mysql", "information_schema", "performance_schema", "sys", "test"}
_MEMBER = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
_PLAN = re.compile(r"^[a-z0-9][a-z0-9+._-]{0,31}$")
_DATABASE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_MAIL_LOCAL = re.compile(r"^[a-z0-9][a-z0-9._+-]{0,63}$")


def php_version(release: str) -> str:
    return PHP_VERSIONS[release]


def pool_file(version: str, member: str) -> str:
    """The member's PHP-FPM configuration (its own master: ``[global]`` and the pool)."""
    return f"{FPM_DIR}/{member}.conf"


def unit_escape(member: str) -> str:
    """``member`` as a unit name's instance or slice part (``systemd-escape``): a '-' would
    make a slice the child of another member's (``a-b`` under ``a``)."""
    return member.replace("-", "\\x2d")


def fpm_unit(member: str) -> str:
    """The member's own PHP-FPM master (an instance of ``FPM_TEMPLATE``)."""
    return f"selfhost-php@{unit_escape(member)}.service"


def member_slice(member: str) -> str:
    """The member's slice, under ``selfhost-members.slice``: the plan's CPU, memory and
    process limits on everything of the member's that systemd runs."""
    return f"selfhost-members-{unit_escape(member)}.slice"


def socket_of(member: str) -> str:
    return f"/run/php/selfhost-{member}.sock"


class Plan(StrictModel):
    """What a member gets by default: the association's named offers ("small", "php")."""

    php: bool = Field(default=False, description="Whether the member's sites may run PHP "
                      "(in the member's own PHP-FPM pool). Off: static sites only.")
    php_workers: int = Field(default=4, ge=1, le=64, description="Most PHP processes the "
                             "member's pool runs at once (pm.max_children): requests beyond "
                             "wait, the other members' sites are not slowed down by them.")
    php_memory_mb: int = Field(default=128, ge=16, le=4096, description="Memory one PHP "
                               "request of the member may use (memory_limit), in MB.")
    php_time_limit_s: int = Field(default=30, ge=1, le=600, description="CPU seconds one PHP "
                                  "request may use (max_execution_time); the pool kills a "
                                  "request still running 30 s after it.")
    upload_mb: int = Field(default=16, ge=1, le=1024, description="Largest upload (request "
                           "body) accepted by the member's sites, in MB.")
    databases: int = Field(default=0, ge=0, le=100, description="How many MariaDB databases "
                           "the member may have (0: none).")
    post_per_minute: int = Field(default=20, ge=0, le=100_000, description="POST requests "
                                 "(form submissions, logins) one client address may send to "
                                 "the member's sites within a minute; beyond, that address is "
                                 "banned from the web ports (fail2ban, for the hardening's ban "
                                 "time): a script flooding a form is cut off. 0: no limit.")
    spike_requests_per_minute: int = Field(default=600, ge=0, le=10_000_000, description=(
        "Requests a minute to one of the member's sites above which the admins are alerted "
        "(a traffic spike: the early sign of an abused form or a hacked site). 0: no alert."))
    spike_mb_per_minute: int = Field(default=200, ge=0, le=1_000_000, description=(
        "MB a minute served by one of the member's sites above which the admins are alerted. "
        "0: no alert."))
    mailboxes: int = Field(default=1, ge=0, le=100, description="How many mailboxes the "
                           "member may have on the host's mail service (0: none).")
    mail_quota_mb: int = Field(default=1024, ge=1, le=10_000_000, description="Largest size "
                               "of each of the member's mailboxes (MB); mail beyond it is "
                               "refused with Dovecot's 'Quota exceeded'.")
    mail_per_minute: int | None = Field(
        default=None, ge=1, le=100_000, description="Messages the member may send per minute, "
        "from each of its mailboxes' logins and from its Unix user's sendmail (PHP's mail()); "
        "empty: the mail service's outbound_limits.")
    mail_per_day: int | None = Field(
        default=None, ge=1, le=10_000_000, description="Messages the member may send per 24 "
        "hours (counted like mail_per_minute); empty: the mail service's outbound_limits.")
    mail_first_time_per_day: int | None = Field(
        default=None, ge=1, le=1_000_000, description="New outside recipients the member may "
        "add per 24 hours (counted like mail_per_minute); empty: the mail service's "
        "outbound_limits.")

    memory_mb: int = Field(default=512, ge=32, le=65536, description="Memory all of the "
                           "member's PHP processes together may use (MemoryMax of the "
                           "member's systemd slice), in MB: past it the kernel reclaims and "
                           "then kills within the member's slice only. At least "
                           "php_memory_mb.")
    cpu_percent: int = Field(default=100, ge=5, le=6400, description="CPU time the member's "
                             "PHP processes may use together (CPUQuota of the member's "
                             "slice), in percent of one core: a busy member cannot take the "
                             "whole server.")
    tasks: int = Field(default=64, ge=8, le=4096, description="Most processes and threads "
                       "in the member's slice (TasksMax): a fork loop stops there. More than "
                       "php_workers.")
    disk_mb: int = Field(default=0, ge=0, le=16_777_216, description="Disk space the member's "
                         "files may take on the file system holding /srv/members (a user "
                         "quota, hard limit; the soft limit is 90 %), in MB; 0: no quota. "
                         "Applied only where that file system has user quotas on (mount "
                         "option usrquota, then quotacheck and quotaon): elsewhere the "
                         "deploy says so and applies none.")

    def mail_limits(self) -> MailLimits | None:
        """The plan's own mail limits (None: the mail service's apply)."""
        if (self.mail_per_minute, self.mail_per_day, self.mail_first_time_per_day) == (
                None, None, None):
            return None
        return MailLimits(self.mail_per_minute, self.mail_per_day, self.mail_first_time_per_day)


def _default_plans() -> dict[str, Plan]:
    return {"small": Plan(), "php": Plan(php=True, databases=1)}


class MemberSite(StrictModel):
    """One web site of a member."""

    domain: str = Field(description="The site's full host name (its own domain, or a name "
                        "under the association's).", examples=["example.org", "a.asso.org"])
    php: bool = Field(default=False, description="Run the site's .php files with PHP (the "
                      "member's plan must allow PHP); off: static files only.")

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str) -> str:
        v = v.lower().rstrip(".")
        if not re.fullmatch(rf"{_LABEL}(\.{_LABEL})+", v):
            raise ValueError("not a full host name")
        return v


class MemberList(StrictModel):
    """A mailing list of a member (run by the host's list manager, Mailman 3)."""

    address: str = Field(description="The list's address, in one of the mail domains.",
                         examples=["alpha-news@asso.org"])
    owners: list[str] = Field(default_factory=list, description="Who owns the list "
                              "(addresses; default: the member's email).")
    posting: ListPosting = Field(default="members", description="Who may post: 'members', "
                                 "'moderated' (every post held for an owner), 'open'.")
    nonmembers: ListNonmembers = Field(default="hold", description="A post from a "
                                       "non-member: 'hold' for an owner, 'reject', 'discard'.")
    subscription: ListSubscription = Field(default="confirm", description="How a "
                                           "subscription by mail is accepted ('confirm': the "
                                           "address replies to a mailed token).")
    archive: ListArchive = Field(default="private", description="'private': posts kept on "
                                 "the server, for the admin only (never on the web); 'never'.")

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        v = v.lower()
        if not re.fullmatch(rf"[a-z0-9][a-z0-9._-]{{0,63}}@{_LABEL}(\.{_LABEL})+", v):
            raise ValueError("not a list address (local part of a-z 0-9 . _ -, then a domain)")
        return v


class Member(StrictModel):
    """A member of the association: one Unix user, their sites and databases."""

    name: str = Field(description="The member's short name, also their Unix and database "
                      "user name: 1-31 of a-z 0-9 '-', starting with a letter.")
    email: str = Field(pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$", description="Who to contact "
                       "about this member's hosting (required: when their site is abused, "
                       "someone must be told).")
    plan: str = Field(default="small", description="Name of the member's plan (a key of "
                      "`plans`).")
    sites: list[MemberSite] = Field(default_factory=list, description="The member's web "
                                    "sites, served from /srv/members/NAME/sites/DOMAIN.")
    databases: list[str] = Field(default_factory=list, description="The member's MariaDB "
                                 "databases (a-z 0-9 '_', unique on the server); the member's "
                                 "database user has every right on them and none elsewhere.")
    database_password: SecretRef | None = Field(
        default=None, description="Password of the member's database user, as a reference "
        "({env: VAR} or {file: PATH}); only its hash reaches the server. Required with "
        "databases.")
    mailboxes: list[str] = Field(default_factory=list, description="The member's mailboxes on "
                                 "the host's mail service: a local part (in the mail "
                                 "service's first domain) or a full address in one of its "
                                 "domains. Each logs in with the member's password.",
                                 examples=[["alpha", "contact@alpha.asso.example"]])
    aliases: list[str] = Field(default_factory=list, description="Addresses (local parts or "
                               "full addresses in the mail domains) whose mail goes to the "
                               "member's first mailbox.")
    password: SecretRef | None = Field(
        default=None, description="The member's single login password, as a reference ({env: "
        "VAR} or {file: PATH}): it opens each of the member's mailboxes (IMAP, POP3, "
        "submission, so also subscribing and posting to mailing lists by mail; the login is "
        "the mailbox's address); only a bcrypt hash reaches the server. On a host with the "
        "calendars service (radicale) it is also the member's calendar login (the login is "
        "the member's name). Required with mailboxes.")

    @field_validator("mailboxes", "aliases")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        out = []
        for a in v:
            a = a.lower()
            local, at, domain = a.partition("@")
            if not _MAIL_LOCAL.match(local) or (at and not re.fullmatch(
                    rf"{_LABEL}(\.{_LABEL})+", domain)):
                raise ValueError(f"{a!r}: a local part (a-z 0-9 . _ + -) or a full address")
            out.append(a)
        return out
    lists: list[MemberList] = Field(default_factory=list, description="The member's mailing "
                                    "lists (Mailman 3, by mail; needs the mail service).")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _MEMBER.match(v):
            raise ValueError("a member name is 1-31 of a-z 0-9 '-', starting with a letter")
        return v

    @field_validator("databases")
    @classmethod
    def _databases(cls, v: list[str]) -> list[str]:
        for db in v:
            if not _DATABASE.match(db):
                raise ValueError(f"{db!r}: a database name is 1-64 of a-z 0-9 '_', starting "
                                 "with a letter")
        return v

    @property
    def home(self) -> str:
        return f"{HOMES}/{self.name}"

    def docroot(self, domain: str) -> str:
        return f"{self.home}/sites/{domain}"

    @property
    def php(self) -> bool:
        return any(s.php for s in self.sites)


class AssociationService(Service):
    """Hosting for an association's members: isolated sites (static or PHP) and databases."""

    kind: ClassVar[str] = "association"
    uses: ClassVar[tuple[type[Request], ...]] = (SystemUser, VirtualHost, BackupSource,
                                                 HealthCheck, MailAccount, CalendarAccount,
                                                 MailingList)

    plans: dict[str, Plan] = Field(default_factory=_default_plans, description="The named "
                                   "plans members are on (default: 'small', static sites "
                                   "only; 'php', PHP and one database).")
    members: list[Member] = Field(default_factory=list, description="The members.")

    @field_validator("plans")
    @classmethod
    def _plan_names(cls, v: dict[str, Plan]) -> dict[str, Plan]:
        for name in v:
            if not _PLAN.match(name):
                raise ValueError(f"{name!r}: a plan name is 1-32 of a-z 0-9 '+', '.', '_', "
                                 "'-', starting with a letter or digit")
        return v

    def plan_of(self, m: Member) -> Plan:
        return self.plans.get(m.plan) or Plan()

    def plan_problems(self) -> list[Problem]:
        """A plan's slice limits that its own PHP settings could never fit in."""
        out: list[Problem] = []
        for name, p in self.plans.items():
            loc = ("services", "association", "plans", name)
            if p.memory_mb < p.php_memory_mb:
                out.append(Problem((*loc, "memory_mb"), f"plan {name}: memory_mb "
                                   f"{p.memory_mb} is less than one PHP request's "
                                   f"php_memory_mb {p.php_memory_mb}"))
            if p.tasks <= p.php_workers:
                out.append(Problem((*loc, "tasks"), f"plan {name}: tasks {p.tasks} leaves no "
                                   f"room for php_workers {p.php_workers} and their master"))
        if any(self.plan_of(m).disk_mb for m in self.members):
            out.append(Problem(("services", "association", "plans"), "disk_mb needs user "
                               "quotas on the file system holding /srv/members (mount option "
                               "usrquota, then quotacheck -cum and quotaon -u): where they "
                               "are off, the deploy says so and applies no quota",
                               severity="warning"))
        return out

    def assertions(self, env: Env) -> list[Problem]:
        from selfhost.models.server import RESERVED_USERS

        base = ("services", "association", "members")
        out: list[Problem] = self.plan_problems()
        admins = {a.name for a in env.server.admins}
        names: dict[str, int] = {}
        domains: dict[str, tuple[str | int, ...]] = {}
        dbs: dict[str, tuple[str | int, ...]] = {}
        for i, m in enumerate(self.members):
            loc = (*base, i)
            if m.name in names:
                out.append(Problem((*loc, "name"), f"member {m.name} is listed twice",
                                   other=(*base, names[m.name], "name")))
            names.setdefault(m.name, i)
            if m.name in admins:
                out.append(Problem((*loc, "name"), f"member {m.name} has the name of an admin: "
                                   "members are not admins, give the member another name"))
            if (m.name in RESERVED_USERS or m.name in SERVICE_USERS
                    or m.name.startswith(("systemd-", "debian-"))):
                out.append(Problem((*loc, "name"), f"{m.name} is a system account's name"))
            if m.plan not in self.plans:
                out.append(Problem((*loc, "plan"), f"no plan named {m.plan!r} (plans: "
                                   f"{', '.join(sorted(self.plans)) or 'none'})"))
                continue
            plan = self.plans[m.plan]
            for j, s in enumerate(m.sites):
                if s.domain in domains:
                    out.append(Problem((*loc, "sites", j, "domain"), f"site {s.domain} is "
                                       "listed twice", other=domains[s.domain]))
                domains.setdefault(s.domain, (*loc, "sites", j, "domain"))
                if s.php and not plan.php:
                    out.append(Problem((*loc, "sites", j, "php"), f"site {s.domain} runs PHP "
                                       f"but plan {m.plan} does not allow PHP"))
            if len(m.databases) > plan.databases:
                out.append(Problem((*loc, "databases"), f"{len(m.databases)} databases, but "
                                   f"plan {m.plan} allows {plan.databases}"))
            if m.databases and m.database_password is None:
                out.append(Problem((*loc, "database_password"), f"member {m.name} has "
                                   "databases: give database_password (a reference)"))
            for k, db in enumerate(m.databases):
                if db in RESERVED_DATABASES:
                    out.append(Problem((*loc, "databases", k), f"{db} is a database of "
                                       "MariaDB itself"))
                elif db in dbs:
                    out.append(Problem((*loc, "databases", k), f"database {db} is listed "
                                       "twice", other=dbs[db]))
                dbs.setdefault(db, (*loc, "databases", k))
            out += self.mail_problems(env, m, loc, plan)
        return out

    def mail_problems(self, env: Env, m: Member, loc: tuple[str | int, ...],
                      plan: Plan) -> list[Problem]:
        """A member's mailboxes: within the plan, a password, a mail service to hold them
        (the addresses themselves are checked by the mail service, at these paths)."""
        out: list[Problem] = []
        if len(m.mailboxes) > plan.mailboxes:
            out.append(Problem((*loc, "mailboxes"), f"{len(m.mailboxes)} mailboxes, but plan "
                               f"{m.plan} allows {plan.mailboxes}"))
        if m.aliases and not m.mailboxes:
            out.append(Problem((*loc, "aliases"), f"member {m.name}'s aliases go to its first "
                               "mailbox: give mailboxes"))
        if m.mailboxes and m.password is None:
            out.append(Problem((*loc, "password"), f"member {m.name} has mailboxes: give "
                               "password (a reference: the member's single login)"))
        mail = getattr(env.server.services, "mail", None)
        if m.mailboxes and (mail is None or not mail.enabled):
            out.append(Problem((*loc, "mailboxes"), f"member {m.name} has mailboxes but this "
                               "host has no mail service: add services.mail (with the "
                               "association's mail domains)"))
        return out

    def mail_requests(self, env: Env, m: Member, origin: str) -> list[Request]:
        """The member's mailboxes, asked of the mail service: one password for all (the
        single login), the plan's quota and limits, the aliases to the first mailbox, and the
        member's Unix user's sendmail under the same limits."""
        mail = getattr(env.server.services, "mail", None)
        if m.password is None or mail is None or not mail.enabled:
            return []  # reported by mail_problems (without a mail service: "add" it)
        plan = self.plan_of(m)
        return [MailAccount(
            address, m.password, quota_mb=plan.mail_quota_mb, owner=f"member {m.name}",
            aliases=tuple(m.aliases) if j == 0 else (), aliases_origin=f"{origin}.aliases",
            limits=plan.mail_limits(), local_login=m.name if j == 0 else None,
            origin=f"{origin}.mailboxes.{j}") for j, address in enumerate(m.mailboxes)]

    def calendar_requests(self, env: Env, m: Member, origin: str) -> list[Request]:
        """The member's login on the host's calendars service (Radicale), when there is one:
        the member's name and single password (the radicale module checks the name against
        its own users, at the member's name)."""
        radicale = getattr(env.server.services, "radicale", None)
        if m.password is None or radicale is None or not radicale.enabled:
            return []
        return [CalendarAccount(m.name, m.password, owner=f"member {m.name}",
                                origin=f"{origin}.name")]

    def requests(self, env: Env) -> list[Request]:
        out: list[Request] = []
        for i, m in enumerate(self.members):
            origin = f"{env.path}.members.{i}"
            out.append(SystemUser(m.name, home=m.home, origin=origin))
            out.append(BackupSource(m.home, origin=origin))
            out += self.mail_requests(env, m, origin)
            out += self.calendar_requests(env, m, origin)
            plan = self.plan_of(m)
            for j, s in enumerate(m.sites):
                out.append(VirtualHost(
                    s.domain, root=m.docroot(s.domain),
                    php_fastcgi=socket_of(m.name) if s.php else None,
                    max_body_mb=plan.upload_mb, watch=TrafficWatch(
                        post_max=plan.post_per_minute, post_seconds=60,
                        requests_per_minute=plan.spike_requests_per_minute,
                        mb_per_minute=plan.spike_mb_per_minute),
                    origin=f"{origin}.sites.{j}"))
            out += [MailingList(li.address, tuple(li.owners or [m.email.lower()]), li.posting,
                                li.nonmembers, li.subscription, li.archive,
                                f"List of member {m.name}", origin=f"{origin}.lists.{k}")
                    for k, li in enumerate(m.lists)]
        if self.databases():
            out.append(BackupSource(DUMP, before=DUMP_SCRIPT))
            out.append(HealthCheck("unit", "mariadb.service"))
        return out

    def databases(self) -> list[tuple[Member, str]]:
        return [(m, db) for m in self.members for db in m.databases]

    # ------------------------------------------------------------------ PHP

    def pool(self, m: Member, version: str, mail: bool = False) -> str:
        """The member's PHP-FPM pool; ``mail``: the host's mail service counts and holds
        local logins' sendmail, so ``mail()`` is allowed (see the module's docstring)."""
        plan = self.plan_of(m)
        home = m.home
        lines = [
            "; Managed by selfhost: changes here are overwritten on the next deploy.",
            f"; Member {m.name}, plan {m.plan}: this member's own PHP-FPM, run by",
            f"; {fpm_unit(m.name)} in {member_slice(m.name)}.",
            "[global]",
            "error_log = syslog",
            f"syslog.ident = php-fpm-{m.name}",
            f"process.max = {plan.php_workers}",
            "",
            f"[{m.name}]",
            f"user = {m.name}",
            f"group = {m.name}",
            f"listen = {socket_of(m.name)}",
            "; Only the web server (Caddy's group) may open the socket.",
            "listen.owner = root",
            "listen.group = caddy",
            "listen.mode = 0660",
            "pm = ondemand",
            f"pm.max_children = {plan.php_workers}",
            "pm.process_idle_timeout = 60s",
            "pm.max_requests = 500",
            f"request_terminate_timeout = {plan.php_time_limit_s + 30}s",
            "rlimit_core = 0",
            "security.limit_extensions = .php",
            "clear_env = yes",
            f"env[TMPDIR] = {home}/tmp",
            f"php_admin_value[open_basedir] = {home}/",
            f"php_admin_value[upload_tmp_dir] = {home}/tmp",
            f"php_admin_value[sys_temp_dir] = {home}/tmp",
            f"php_admin_value[session.save_path] = {home}/tmp",
            f"php_admin_value[error_log] = {home}/logs/php-errors.log",
            "php_admin_flag[log_errors] = on",
            "php_admin_flag[display_errors] = off",
            "php_admin_flag[allow_url_include] = off",
            "php_admin_flag[allow_url_fopen] = off",
            f"php_admin_value[memory_limit] = {plan.php_memory_mb}M",
            f"php_admin_value[max_execution_time] = {plan.php_time_limit_s}",
            f"php_admin_value[upload_max_filesize] = {plan.upload_mb}M",
            f"php_admin_value[post_max_size] = {plan.upload_mb}M",
            "php_admin_value[disable_functions] = " + ",".join(
                f for f in DISABLED_FUNCTIONS if not (mail and f == "mail")),
            *([
                "; mail(): sent as this member, counted and held past the limits by the mail",
                "; service (see selfhost.services.association); the header names the script.",
                "php_admin_value[sendmail_path] = /usr/sbin/sendmail -t -i",
                "php_admin_flag[mail.add_x_header] = on",
                "; Each mail() call logged (syslog, identifier php) with the script's full path:",
                "; the alert over a limit names the member's site and script from it.",
                "php_admin_value[mail.log] = syslog",
            ] if mail else [
                "; No mail(): this host has no mail service to count and hold it.",
                "php_admin_value[sendmail_path] = /bin/false",
            ]),
            "",
        ]
        return "\n".join(lines)

    def php_ini(self) -> str:
        return "\n".join([
            "; Managed by selfhost: PHP settings for every member's pool.",
            "expose_php = Off",
            "; One OPcache for every pool: a member's cached scripts are checked against",
            "; the file's permissions and the pool's root, and its API is closed.",
            "opcache.validate_permission = 1",
            "opcache.validate_root = 1",
            "opcache.restrict_api = /nonexistent/",
            "",
        ])

    # ------------------------------------------------------------------ MariaDB

    def sql(self) -> tuple[str, tuple[SecretPiece, ...]]:
        lines = ["-- Managed by selfhost: applied as root whenever it changes.",
                 "-- Every member's rights are revoked, then granted again from the model."]
        secrets: list[SecretPiece] = []
        for m in self.members:
            if not m.databases or m.database_password is None:
                continue
            user = f"'{m.name}'@'localhost'"
            mark = SECRET_MARK.format(len(secrets))
            secrets.append(SecretPiece(m.database_password, "mysql-native"))
            for db in m.databases:
                lines.append(f"CREATE DATABASE IF NOT EXISTS `{db}` CHARACTER SET utf8mb4 "
                             "COLLATE utf8mb4_unicode_ci;")
            lines += [
                f"CREATE USER IF NOT EXISTS {user} IDENTIFIED VIA mysql_native_password "
                f"USING '{mark}';",
                f"ALTER USER {user} IDENTIFIED VIA mysql_native_password USING '{mark}';",
                f"REVOKE ALL PRIVILEGES, GRANT OPTION FROM {user};",
            ]
            lines += [f"GRANT ALL PRIVILEGES ON `{db}`.* TO {user};" for db in m.databases]
        lines.append("")
        return "\n".join(lines), tuple(secrets)

    def mariadb_cnf(self) -> str:
        return "\n".join([
            "# Managed by selfhost: changes here are overwritten on the next deploy.",
            "[mysqld]",
            "# Local clients only (the members' PHP, the backup dump).",
            "bind-address = 127.0.0.1",
            "local-infile = 0",
            "",
        ])

    def contribute(self, env: Env) -> Contribution:
        c = Contribution()
        if not self.members:
            return c
        c.directories.append(ManagedDir(HOMES, "0711"))
        web = any(m.sites for m in self.members)
        if web:
            c.packages.append("caddy")  # its group owns the homes (the web module runs it)
        for m in self.members:
            group = "caddy" if web else m.name
            c.directories += [
                ManagedDir(m.home, "0750", owner=m.name, group=group),
                ManagedDir(f"{m.home}/sites", "0750", owner=m.name, group=group),
                ManagedDir(f"{m.home}/tmp", "0700", owner=m.name, group=m.name),
                ManagedDir(f"{m.home}/logs", "0750", owner=m.name, group=m.name),
            ]
            c.directories += [ManagedDir(m.docroot(s.domain), "0750", owner=m.name,
                                         group="caddy") for s in m.sites]
        php = [m for m in self.members if m.php]
        if php:
            self._contribute_php(c, env, php)
        if self.databases():
            self._contribute_mariadb(c)
        quotas = self.quotas()
        if quotas:
            c.packages.append("quota")
            c.commands.append(Command(
                "association: members' disk quotas (where the file system has user quotas)",
                self.quota_command(quotas), unless=self.quota_guard(quotas), after_files=True))
        return c

    def quotas(self) -> list[tuple[str, int, int]]:
        """(member, soft, hard limit in KiB) of the members whose plan has ``disk_mb``."""
        out = []
        for m in self.members:
            mb = self.plan_of(m).disk_mb
            if mb:
                out.append((m.name, mb * 1024 * 9 // 10, mb * 1024))
        return sorted(out)

    def _quota_fs(self) -> str:
        return (f"mp=$(findmnt -n -o TARGET --target {HOMES}) && "
                f"fs=$(findmnt -n -o FSTYPE --target {HOMES}) && ")

    @staticmethod
    def _quota_want(quotas: list[tuple[str, int, int]]) -> str:
        return "".join(f"{n} {soft} {hard}\\n" for n, soft, hard in quotas)

    def quota_guard(self, quotas: list[tuple[str, int, int]]) -> str:
        """Shell test: the limits are in place, or the file system has no user quotas and
        that was already reported for these limits."""
        names = " ".join(n for n, _, _ in quotas)
        want = self._quota_want(quotas)
        return (
            self._quota_fs() + "if quotaon -pu \"$mp\" 2>/dev/null | grep -q ' is on'; then "
            f"test \"$(repquota -u \"$mp\" | awk -v w='{names}' 'BEGIN {{ n = split(w, a, \" \"); "
            "for (i = 1; i <= n; i++) m[a[i]] = 1 } ($1 in m) { print $1, $4, $5 }' | sort)\" = "
            f"\"$(printf '{want}')\"; else test \"$(cat {QUOTA_STATE} 2>/dev/null)\" = "
            f"\"$(printf 'unsupported %s %s\\n{want}' \"$fs\" \"$mp\")\"; fi")

    def quota_command(self, quotas: list[tuple[str, int, int]]) -> str:
        """Shell: set each member's limits where the file system has user quotas on; else
        say so (on the deploy's output and in the journal) and remember it was said."""
        want = self._quota_want(quotas)
        sets = " && ".join(f'setquota -u {n} {soft} {hard} 0 0 "$mp"' for n, soft, hard in quotas)
        return (
            self._quota_fs() + "if quotaon -pu \"$mp\" 2>/dev/null | grep -q ' is on'; then "
            f"{sets} && rm -f {QUOTA_STATE}; else "
            f"msg=\"disk quotas NOT applied: $mp ($fs) holding {HOMES} has no user quotas on "
            "(mount it with usrquota, then quotacheck -cum $mp and quotaon -u $mp)\"; "
            'echo "selfhost: $msg" >&2; logger -p user.warning -t selfhost "$msg"; '
            f"printf 'unsupported %s %s\\n{want}' \"$fs\" \"$mp\" > {QUOTA_STATE}; fi")

    def _contribute_php(self, c: Contribution, env: Env, php: list[Member]) -> None:
        v = php_version(env.require_target().release)
        c.packages += ["php-fpm", "php-mysql"]
        fpm = f"php-fpm{v}"
        c.directories.append(ManagedDir(FPM_DIR, "0755"))
        pools = [pool_file(v, m.name) for m in php]
        mail = getattr(env.server.services, "mail", None)
        with_mail = mail is not None and bool(mail.enabled)
        template = f"{UNIT_DIR}/{FPM_TEMPLATE}"
        c.files.append(ManagedFile(template, self.fpm_template(v),
                                   validate=(
            'd=$(mktemp -d) && cp {path} "$d/' + FPM_TEMPLATE + '" && systemd-analyze verify '
            '"$d/' + FPM_TEMPLATE + '" >/dev/null; rc=$?; rm -rf "$d"; exit $rc')))
        ini = f"/etc/php/{v}/fpm/conf.d/90-selfhost.ini"
        c.files.append(ManagedFile(ini, self.php_ini(), validate=(
            "out=$(php -n -c {path} -r '' 2>&1); [ -z \"$out\" ] || { echo \"$out\"; exit 1; }")))
        for m, path in zip(php, pools, strict=True):
            c.files.append(ManagedFile(path, self.pool(m, v, with_mail),
                                       validate=f"{fpm} -t -y {{path}}"))
            c.files.append(ManagedFile(f"{UNIT_DIR}/{member_slice(m.name)}", self.slice(m)))
        c.commands.append(Command(
            "association: Debian's shared php-fpm off and former members' PHP stopped "
            "(each member has a PHP-FPM of its own)",
            self.fpm_cleanup(v, php), unless=self.fpm_cleanup_guard(v, php),
            after_files=True))
        for m, path in zip(php, pools, strict=True):
            # A slice's limits apply when systemd's configuration is reloaded (the backend
            # does after changed unit files); a changed unit file restarts the master.
            c.units.append(Unit(fpm_unit(m.name), reload_on=(path, ini)))

    def fpm_template(self, version: str) -> str:
        fpm = f"/usr/sbin/php-fpm{version}"
        return "\n".join([
            "# Managed by selfhost: one PHP-FPM master per association member, in the",
            "# member's own slice (its CPU, memory and process limits).",
            "[Unit]",
            "Description=selfhost: PHP-FPM of association member %I",
            "After=network.target",
            "",
            "[Service]",
            "Type=notify",
            "Slice=selfhost-members-%i.slice",
            f"ExecStartPre={fpm} -t -y {FPM_DIR}/%I.conf",
            f"ExecStart={fpm} --nodaemonize --fpm-config {FPM_DIR}/%I.conf",
            "ExecReload=/bin/kill -USR2 $MAINPID",
            "RuntimeDirectory=php",
            "RuntimeDirectoryPreserve=yes",
            "RuntimeDirectoryMode=0755",
            "Restart=on-failure",
            "",
            "[Install]",
            "WantedBy=multi-user.target",
            "",
        ])

    def slice(self, m: Member) -> str:
        plan = self.plan_of(m)
        return "\n".join([
            "# Managed by selfhost: changes here are overwritten on the next deploy.",
            f"# Association member {m.name}, plan {m.plan}.",
            "[Unit]",
            f"Description=selfhost: association member {m.name}",
            "",
            "[Slice]",
            f"MemoryMax={plan.memory_mb}M",
            f"CPUQuota={plan.cpu_percent}%",
            f"TasksMax={plan.tasks}",
            "",
        ])

    def _fpm_stale(self, version: str, php: list[Member]) -> str:
        """Shell printing what is left of PHP that the model no longer has: Debian's own
        php-fpm (unless masked and stopped), pool files of the first layout in its pool.d,
        the masters and files of members no longer on PHP."""
        keep = " ".join(shlex.quote(m.name) for m in php)
        debian = f"php{version}-fpm.service"
        wants = f"{UNIT_DIR}/multi-user.target.wants"
        return (
            f'{{ [ "$(systemctl is-enabled {debian} 2>/dev/null)" = masked ] && '
            f"! systemctl is-active -q {debian} || echo {debian}; "
            f"ls /etc/php/{version}/fpm/pool.d/selfhost-*.conf 2>/dev/null; "
            f'for f in {FPM_DIR}/*.conf {UNIT_DIR}/selfhost-members-*.slice; do [ -e "$f" ] '
            '|| continue; n=${f##*/}; case $n in *.slice) n=${n#selfhost-members-}; '
            'n=$(systemd-escape -u -- "${n%.slice}");; *) n=${n%.conf};; esac; '
            f'case " {keep} " in *" $n "*) ;; *) echo "$f";; esac; done; '
            "{ systemctl list-units --all --plain --no-legend "
            "--state=active,activating,deactivating,reloading,failed 'selfhost-php@*.service'; "
            f"ls {wants}; }} 2>/dev/null | grep -o 'selfhost-php@[^ ]*[.]service' | sort -u | "
            'while read -r u; do n=${u#selfhost-php@}; '
            'n=$(systemd-escape -u -- "${n%.service}"); '
            f'case " {keep} " in *" $n "*) ;; *) echo "$u";; esac; done; }}')

    def fpm_cleanup_guard(self, version: str, php: list[Member]) -> str:
        return f'test -z "$({self._fpm_stale(version, php)})"'

    def fpm_cleanup(self, version: str, php: list[Member]) -> str:
        debian = f"php{version}-fpm.service"
        return (
            f"for x in $({self._fpm_stale(version, php)}); do case $x in "
            f"{debian}) systemctl disable --now {debian} >/dev/null 2>&1; "
            f"systemctl mask {debian} >/dev/null;; "
            '*.service) systemctl disable --now "$x" >/dev/null 2>&1; '
            'systemctl reset-failed "$x" 2>/dev/null;; '
            '*) rm -f "$x";; esac; done; systemctl daemon-reload')

    def _contribute_mariadb(self, c: Contribution) -> None:
        c.packages.append("mariadb-server")
        c.directories += [ManagedDir("/etc/selfhost", "0755"),
                          ManagedDir("/etc/selfhost/mariadb", "0700"),
                          ManagedDir("/usr/local/lib/selfhost", "0755")]
        c.files.append(ManagedFile(MARIADB_CNF, self.mariadb_cnf(), validate=(
            "mariadbd --defaults-file={path} --user=mysql --help --verbose >/dev/null")))
        text, secrets = self.sql()
        c.files.append(ManagedFile(SQL, text, mode="0600", secrets=secrets))
        c.files.append(ManagedFile(DUMP_LIST, "# member\tdatabase\n" + "".join(
            f"{m.name}\t{db}\n" for m, db in self.databases()), mode="0600"))
        c.files.append(ManagedFile(DUMP_SCRIPT, DUMP_SH, mode="0755", validate="bash -n {path}"))
        c.commands.append(Command(
            "association: MariaDB databases, users and rights",
            f"systemctl start mariadb.service && mariadb --batch < {SQL}", on_change=(SQL,)))
        c.units.append(Unit("mariadb.service", reload_on=(MARIADB_CNF,), reload=False))


DUMP_SH = r"""#!/bin/bash
# Managed by selfhost: dump every member database before a backup, one file per database
# under /var/backups/selfhost/mariadb/MEMBER/ (root only), each written whole then renamed.
set -euo pipefail
umask 077
install -d -m 0700 /var/backups/selfhost/mariadb
while IFS=$'\t' read -r member db; do
  case $member in ''|'#'*) continue ;; esac
  dir=/var/backups/selfhost/mariadb/$member
  install -d -m 0700 "$dir"
  mariadb-dump --single-transaction --routines --events --databases "$db" > "$dir/$db.sql.new"
  mv -f "$dir/$db.sql.new" "$dir/$db.sql"
done < /etc/selfhost/mariadb/databases.tsv
"""
