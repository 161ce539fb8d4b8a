"""Mailing lists: Mailman 3 core (Debian's ``mailman3``), subscription and posting by mail.

**Why Mailman 3 and not Sympa.** Both are in Debian 12 and 13 (``mailman3`` 3.3.8 and
3.3.10, ``sympa`` 6.2.70 and 6.2.76). Measured with ``apt-get install -s
--no-install-recommends`` in the project's Debian images: ``mailman3`` brings 77 packages on
Debian 12 and 73 on Debian 13 (Python libraries and SQLite; installed in about 30 s), ``sympa``
174 and 179 (Perl modules and a database client, and its web interface wants a CGI/FastCGI
server on top). Mailman 3 core alone is a complete list server driven by mail: it takes the
list's mail over LMTP, sends over SMTP, keeps its data in one SQLite file, and its
configuration is one ``mailman.cfg``. No web interface is needed: members subscribe
(``LIST-join@``, or ``subscribe`` to ``LIST-request@``) and post by mail from their mailbox,
through the mail server's authenticated submission, so the member's mailbox login is the one
login for mail, lists and calendar. Postorius and HyperKitty (``mailman3-web``) would bring
Django, a WSGI server, a second database and a web archive: not installed.

**Archives are private by default.** There is no web archiver at all: with ``archive:
private`` (the default) each post is kept by Mailman's ``prototype`` archiver, a Maildir per
list under ``/var/lib/mailman3/archives/prototype/``, readable by the ``list`` user (and root)
only (``/var/lib/mailman3`` is ``0750 list:list``: the members' Unix users cannot read other
lists' archives, held messages or subscribers), backed up with the rest; ``never`` keeps no
archive. Nothing is served over HTTP.

**How it plugs in.** The module provides :class:`~selfhost.compose.requests.MailingList`
(the association module asks for its members' lists; lists may also be declared here under
``lists``) and asks the mail server (:class:`~selfhost.compose.requests.ListAddresses`) to

- hand the lists' addresses (``LIST@``, ``LIST-request@``, ``-join``, ``-leave``,
  ``-owner``, ``-bounces``, ``-confirm``, ``-subscribe``, ``-unsubscribe``; with
  ``+cookie`` extensions) to Mailman's LMTP runner on ``127.0.0.1:8024``; only Postfix (and
  root) may connect to that port (an nftables rule), so nobody on the host posts around
  Postfix's checks;
- take Mailman's outgoing mail on a loopback port of its own, ``127.0.0.1:10027``, which
  only the ``list`` user (and root) may connect to. That smtpd asks postfwd at the end of
  each message with the **envelope sender as the key** (``LIST-bounces@DOMAIN``: VERP is
  off for posts and notices, so the key is the list; only the mail Mailman forwards to the
  list's owners is VERP'd by Mailman itself, ``LIST-bounces+OWNER=DOMAIN@``, one key per
  owner of the model: measured in the scenario with postfwd's ``--dumpcache``), with the
  same limits as every local sender and **held** past them (``selfhost held``), and asks
  the first-time recipients service too. Chosen over
  a SASL login on the submission port: no password for Mailman to keep, no TLS on the
  loopback, and the limit is per list rather than per shared login. Mail leaves signed by
  OpenDKIM like the rest (the milters run on that port).

Lists are made from the model by ``/usr/local/lib/selfhost/mailman-lists``
(``mailman_lists.py``), run as ``list`` with Mailman's own Python API in process (as
``mailman withlist`` does): it creates the missing domains and lists and sets each list's
owners, posting, subscription and archive policies; its ``--check`` mode is the deploy's
guard, so a converged host runs nothing. Mailman's REST server is switched off (``[runner.rest]
start: no``): nothing needs it, so there is no admin password to keep and no port for the
members' programs to try. Nothing is deleted: a list removed from the model keeps its
members and archive. ``mailman.cfg`` is checked by ``mailman conf`` as ``list`` before it
replaces the live one; Mailman is then restarted.

Backups: ``/var/lib/mailman3`` (lists, archives, queues) and a copy of the SQLite database
made with SQLite's online backup API before each backup (consistent while Mailman runs).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import ClassVar

from pydantic import Field, field_validator

from selfhost.compose.module import Contribution, Env, Problem
from selfhost.compose.requests import (
    BackupSource,
    HealthCheck,
    ListAddresses,
    ListArchive,
    ListNonmembers,
    ListPosting,
    ListSubscription,
    LoopbackGuard,
    MailingList,
    Request,
)
from selfhost.compose.resources import Command, ManagedDir, ManagedFile, Unit
from selfhost.models.base import StrictModel
from selfhost.services.base import Service

CONFIG = "/etc/mailman3/mailman.cfg"
VAR = "/var/lib/mailman3"
DATABASE = f"{VAR}/data/mailman.db"
LISTS_JSON = "/etc/selfhost/mailman/lists.json"
APPLY = "/usr/local/lib/selfhost/mailman-lists"
DUMP = "/var/backups/selfhost/mailman"
LMTP_PORT = 8024
SUBMIT_PORT = 10027
"""The mail server's loopback smtpd for Mailman's outgoing mail (counted by postfwd)."""
USER = "list"
"""Debian's mailman3 runs as the ``list`` user of base-passwd."""
SUFFIXES = ("", "-bounces", "-confirm", "-join", "-leave", "-owner", "-request",
            "-subscribe", "-unsubscribe")
"""Mailman 3's addresses of a list (``mailman.mta.postfix``'s SUBDESTINATIONS)."""
APPLY_TEXT = (Path(__file__).parent / "mailman_lists.py").read_text(encoding="utf-8")
VALIDATE_PYTHON = (
    "d=$(mktemp -d) && PYTHONPYCACHEPREFIX=\"$d\" python3 -m py_compile {path}; rc=$?; "
    "rm -rf \"$d\"; exit $rc")
_ADDRESS = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}@(?!-)[a-z0-9-]{1,63}(?<!-)"
                      r"(\.(?!-)[a-z0-9-]{1,63}(?<!-))+$")


def list_addresses(address: str) -> tuple[str, ...]:
    """Every address of the list ``address`` (the list's and its command addresses)."""
    local, domain = address.split("@", 1)
    return tuple(f"{local}{s}@{domain}" for s in SUFFIXES)


def dump_command() -> str:
    """A consistent copy of Mailman's SQLite database (SQLite's online backup API: readers
    and writers keep going), written whole then renamed."""
    new = f"{DUMP}/mailman.db.new"
    return (f"install -d -m 0700 {DUMP} && rm -f {new} && python3 -c \"import sqlite3,sys; "
            "s=sqlite3.connect('file:'+sys.argv[1]+'?mode=ro', uri=True); "
            f"d=sqlite3.connect(sys.argv[2]); s.backup(d); d.close()\" {DATABASE} {new} && "
            f"mv -f {new} {DUMP}/mailman.db")


class ListSettings(StrictModel):
    """A mailing list: its address, owners and policies."""

    address: str = Field(description="The list's address, in one of the mail domains "
                         "(lower case); its command addresses (LIST-request, -join, -leave, "
                         "-owner, -bounces...) come with it.", examples=["news@example.org"])
    owners: list[str] = Field(min_length=1, description="Who owns the list (addresses): "
                              "they approve held posts and subscriptions, by mail.")
    posting: ListPosting = Field(default="members", description="Who may post: 'members' "
                                 "(others as `nonmembers` says), 'moderated' (every post held "
                                 "for an owner), 'open' (anyone).")
    nonmembers: ListNonmembers = Field(default="hold", description="A post from a "
                                       "non-member: 'hold' for an owner, 'reject' (refused "
                                       "with a notice) or 'discard'.")
    subscription: ListSubscription = Field(default="confirm", description="How a "
                                           "subscription by mail is accepted: 'confirm' "
                                           "(the address replies to a mailed token), "
                                           "'moderate' (an owner approves), "
                                           "'confirm_then_moderate', or 'open'.")
    archive: ListArchive = Field(default="private", description="'private': posts are kept "
                                 "on the server, readable by the admin only (never served "
                                 "on the web); 'never': not kept.")
    description: str = Field(default="", max_length=200, description="One line about the "
                             "list.")

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        v = v.lower()
        if not _ADDRESS.match(v):
            raise ValueError("not a list address (local part of a-z 0-9 . _ -, then a domain)")
        return v

    @field_validator("owners")
    @classmethod
    def _owners(cls, v: list[str]) -> list[str]:
        for o in v:
            if not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", o):
                raise ValueError(f"{o!r} is not an address")
        return [o.lower() for o in v]

    def request(self, origin: str) -> MailingList:
        return MailingList(self.address, tuple(self.owners), self.posting, self.nonmembers,
                           self.subscription, self.archive, self.description, origin=origin)


class MailmanService(Service):
    """Mailing lists with Mailman 3: subscription and posting by mail."""

    kind: ClassVar[str] = "lists"
    provides: ClassVar[tuple[type[Request], ...]] = (MailingList,)
    uses: ClassVar[tuple[type[Request], ...]] = (ListAddresses, LoopbackGuard, BackupSource,
                                                 HealthCheck)

    lists: list[ListSettings] = Field(default_factory=list, description="Mailing lists "
                                      "declared here (other modules, such as the "
                                      "association's members, add theirs).")

    def all_lists(self, env: Env) -> list[MailingList]:
        """The lists declared here, then the ones other modules asked for (by address)."""
        mine = [s.request(f"{env.path}.lists.{i}") for i, s in enumerate(self.lists)]
        out = {r.address: r for r in reversed(mine)}
        for r in env.incoming(MailingList):
            out.setdefault(r.address, r)
        return sorted(out.values(), key=lambda r: r.address)

    @staticmethod
    def mail_domains(env: Env) -> list[str] | None:
        mail = getattr(env.server.services, "mail", None)
        if mail is None or not mail.enabled:
            return None
        return [d.name for d in mail.domains]

    def assertions(self, env: Env) -> list[Problem]:
        out: list[Problem] = []
        seen: dict[str, int] = {}
        for i, s in enumerate(self.lists):
            if s.address in seen:
                out.append(Problem(("services", "lists", "lists", i, "address"), f"list "
                                   f"{s.address} is listed twice",
                                   other=("services", "lists", "lists", seen[s.address],
                                          "address")))
            seen.setdefault(s.address, i)
        domains = self.mail_domains(env)
        mine = [s.request(f"{env.path}.lists.{i}") for i, s in enumerate(self.lists)]
        for r in [*mine, *env.incoming(MailingList)]:
            loc = tuple(int(p) if p.isdigit() else p for p in r.origin.split(".") if p)
            if domains is None:
                out.append(Problem(loc, f"mailing list {r.address} needs the mail service "
                                   "(services.mail): Mailman receives and sends through it"))
            elif r.address.split("@", 1)[1] not in domains:
                out.append(Problem((*loc, "address"), f"{r.address}: "
                                   f"{r.address.split('@', 1)[1]} is not one of the mail "
                                   f"domains ({', '.join(domains)})"))
        return out

    def requests(self, env: Env) -> list[Request]:
        lists = self.all_lists(env)
        if not lists:
            return []
        out: list[Request] = []
        if self.mail_domains(env) is not None:
            out += [ListAddresses(r.address, list_addresses(r.address),
                                  f"127.0.0.1:{LMTP_PORT}", SUBMIT_PORT, USER, origin=r.origin)
                    for r in lists]
        out += [
            # Only Postfix hands mail to Mailman: nobody posts around its checks. (Mailman's
            # own LMTP runner connects to its port once as it starts, to check it listens:
            # refused, the runner exits and nothing is delivered.)
            LoopbackGuard(LMTP_PORT, ("postfix", USER, "root")),
            BackupSource(VAR),
            BackupSource(DUMP, before=dump_command()),
            HealthCheck("unit", "mailman3.service"),
            HealthCheck("tcp", f"127.0.0.1:{LMTP_PORT}"),
        ]
        return out

    def config(self, env: Env) -> str:
        mail = getattr(env.server.services, "mail", None)
        first = mail.domains[0].name if mail is not None and mail.domains else env.server.fqdn
        notify = env.server.notify
        owner = notify.email if notify is not None else f"postmaster@{first}"
        return "\n".join([
            "# Managed by selfhost: changes here are overwritten on the next deploy.",
            "# Mailman 3 core only: lists by mail, no web interface, no REST server.",
            "[mailman]",
            f"site_owner: {owner}",
            "noreply_address: noreply",
            "default_language: en",
            "layout: debian",
            "",
            "[paths.debian]",
            f"var_dir: {VAR}",
            "queue_dir: $var_dir/queue",
            "bin_dir: /usr/lib/mailman3/bin",
            "list_data_dir: $var_dir/lists",
            "log_dir: /var/log/mailman3",
            "lock_dir: $var_dir/locks",
            "data_dir: $var_dir/data",
            "cache_dir: $var_dir/cache",
            "etc_dir: /etc/mailman3",
            "ext_dir: $var_dir/ext",
            "messages_dir: $var_dir/messages",
            "archive_dir: $var_dir/archives",
            "template_dir: $var_dir/templates",
            "pid_file: /run/mailman3/master.pid",
            "lock_file: $lock_dir/master.lck",
            "",
            "[database]",
            "class: mailman.database.sqlite.SQLiteDatabase",
            "url: sqlite:///$DATA_DIR/mailman.db",
            "",
            "[logging.debian]",
            "format: %(asctime)s (%(process)d) %(message)s",
            "datefmt: %b %d %H:%M:%S %Y",
            "propagate: no",
            "level: info",
            "path: mailman.log",
            "",
            "# Nothing uses the REST API (lists are applied in process): no port, no password.",
            "[runner.rest]",
            "start: no",
            "",
            "[mta]",
            "# The mail server routes the lists' addresses here itself (from the model):",
            "# Mailman writes no Postfix maps.",
            "incoming: mailman.mta.null.NullMTA",
            "outgoing: mailman.mta.deliver.deliver",
            "lmtp_host: 127.0.0.1",
            f"lmtp_port: {LMTP_PORT}",
            "# Outgoing mail: the mail server's loopback port for Mailman, counted by postfwd",
            "# per envelope sender (the list's -bounces address: VERP stays off).",
            "smtp_host: 127.0.0.1",
            f"smtp_port: {SUBMIT_PORT}",
            "smtp_user:",
            "smtp_pass:",
            "verp_personalized_deliveries: no",
            "verp_delivery_interval: 0",
            "verp_probes: no",
            "",
            "# Private archives: a Maildir per list on the server, no web archive.",
            "[archiver.prototype]",
            "enable: yes",
            "",
        ])

    def lists_json(self, env: Env) -> str:
        return json.dumps({"lists": [{
            "address": r.address, "owners": list(r.owners), "posting": r.posting,
            "nonmembers": r.nonmembers, "subscription": r.subscription,
            "archive": r.archive, "description": r.description,
        } for r in self.all_lists(env)]}, indent=1, sort_keys=True) + "\n"

    def contribute(self, env: Env) -> Contribution:
        c = Contribution()
        if not self.all_lists(env):
            return c
        c.packages.append("mailman3")
        # Lists, archives, held messages and subscribers: Mailman's user only.
        c.directories += [ManagedDir(VAR, "0750", owner=USER, group=USER),
                          ManagedDir("/etc/selfhost", "0755"),
                          ManagedDir("/etc/selfhost/mailman", "0755"),
                          ManagedDir("/usr/local/lib/selfhost", "0755")]
        c.files += [
            ManagedFile(CONFIG, self.config(env), mode="0640", group=USER, validate=(
                f"cd / && runuser -u {USER} -- mailman -C {{path}} conf -s mta >/dev/null")),
            ManagedFile(LISTS_JSON, self.lists_json(env), validate=(
                "python3 -c 'import json,sys; json.load(open(sys.argv[1]))' {path}")),
            ManagedFile(APPLY, APPLY_TEXT, mode="0755", validate=VALIDATE_PYTHON),
        ]
        run = f"cd / && runuser -u {USER} -- python3 {APPLY}"
        c.commands.append(Command(
            "mailman: lists, owners and policies from the model",
            f"{run} {LISTS_JSON}", unless=f"{run} --check {LISTS_JSON} >/dev/null",
            after_files=True))
        c.units.append(Unit("mailman3.service", reload_on=(CONFIG,), reload=False))
        return c
