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

Plans (``plans``) name the defaults so that 200 members stay readable: whether PHP is allowed,
how many PHP workers, memory and time a member's scripts get, how many databases.

Not in this first cut: disk quotas, per-member CPU/memory cgroups (the pools share Debian's
one ``php-fpm`` service; a template unit per member in its own slice would give
``MemoryMax``/``CPUQuota``), mailboxes, lists and the single login.

**How mail plugs in.** PHP's ``mail()`` is the hole through which a hacked member form
gets the whole server blacklisted: the pickup path that SMTP policy services never see. On a
host without the mail service, ``mail`` stays in ``disable_functions`` (``sendmail_path =
/bin/false``). On a host with it, the mail module counts every local login's ``sendmail``
per sender and pins that sender to the login (``local_login_sender_maps``: the member's
user can only send as ``MEMBER@server``), holding the member's mail past the limits and
alerting the admin: so the pools allow ``mail()`` (``sendmail_path = /usr/sbin/sendmail -t
-i``, run as the member's user) with ``mail.add_x_header`` on, which names the script in
an ``X-PHP-Originating-Script`` header that the alert and ``selfhost held`` show. No
per-member SMTP credentials are needed, and the other members' mail keeps flowing when one
member's form is abused.
"""

from __future__ import annotations

import re
import shlex
from typing import ClassVar

from pydantic import Field, field_validator

from selfhost.compose.module import Contribution, Env, Problem
from selfhost.compose.requests import (
    BackupSource,
    HealthCheck,
    ListArchive,
    ListNonmembers,
    ListPosting,
    ListSubscription,
    MailingList,
    Request,
    SystemUser,
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


def php_version(release: str) -> str:
    return PHP_VERSIONS[release]


def pool_file(version: str, member: str) -> str:
    return f"/etc/php/{version}/fpm/pool.d/selfhost-{member}.conf"


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
                                                 HealthCheck, MailingList)

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

    def assertions(self, env: Env) -> list[Problem]:
        from selfhost.models.server import RESERVED_USERS

        base = ("services", "association", "members")
        out: list[Problem] = []
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
        return out

    def requests(self, env: Env) -> list[Request]:
        out: list[Request] = []
        for i, m in enumerate(self.members):
            origin = f"{env.path}.members.{i}"
            out.append(SystemUser(m.name, home=m.home, origin=origin))
            out.append(BackupSource(m.home, origin=origin))
            plan = self.plan_of(m)
            for j, s in enumerate(m.sites):
                out.append(VirtualHost(
                    s.domain, root=m.docroot(s.domain),
                    php_fastcgi=socket_of(m.name) if s.php else None,
                    max_body_mb=plan.upload_mb, origin=f"{origin}.sites.{j}"))
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
            f"; Member {m.name}, plan {m.plan}.",
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
        return c

    def _contribute_php(self, c: Contribution, env: Env, php: list[Member]) -> None:
        v = php_version(env.require_target().release)
        c.packages += ["php-fpm", "php-mysql"]
        fpm = f"php-fpm{v}"
        check = ('d=$(mktemp -d) && printf \'[global]\\npid = %s/fpm.pid\\nerror_log = '
                 '%s/fpm.log\\ninclude = %s\\n\' "$d" "$d" {path} > "$d/fpm.conf" && '
                 f'{fpm} -t -y "$d/fpm.conf"; rc=$?; rm -rf "$d"; exit $rc')
        pools = [pool_file(v, m.name) for m in php]
        mail = getattr(env.server.services, "mail", None)
        with_mail = mail is not None and bool(mail.enabled)
        for m, path in zip(php, pools, strict=True):
            c.files.append(ManagedFile(path, self.pool(m, v, with_mail), validate=check))
        www = f"/etc/php/{v}/fpm/pool.d/www.conf"
        c.files.append(ManagedFile(www, "; Managed by selfhost: Debian's shared www-data pool "
                                   "is off; each member has a pool of its own.\n"))
        ini = f"/etc/php/{v}/fpm/conf.d/90-selfhost.ini"
        c.files.append(ManagedFile(ini, self.php_ini(), validate=(
            "out=$(php -n -c {path} -r '' 2>&1); [ -z \"$out\" ] || { echo \"$out\"; exit 1; }")))
        # Pools of members no longer in the model (their homes and data stay).
        keep = " ".join(shlex.quote(p) for p in pools)
        stale = (f"for f in /etc/php/{v}/fpm/pool.d/selfhost-*.conf; do [ -e \"$f\" ] || "
                 f"continue; case \" {keep} \" in *\" $f \"*) ;; *) echo \"$f\";; esac; done")
        c.commands.append(Command(
            "association: remove the PHP pools of former members",
            f"for f in $({stale}); do rm -f \"$f\"; done; systemctl reload php{v}-fpm.service",
            unless=f'test -z "$({stale})"', after_files=True))
        c.units.append(Unit(f"php{v}-fpm.service", reload_on=(*pools, www, ini)))

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
