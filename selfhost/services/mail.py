"""Mail: Postfix (SMTP) and Dovecot (IMAP) from Debian, with DKIM signing by OpenDKIM.

- **Postfix** receives mail for the mail domains on port 25 (STARTTLS offered, no login
  there) and takes the users' mail on submission ports 587 (STARTTLS required before AUTH)
  and 465 (TLS from the first byte). A logged-in user may only send as an address they own
  (their mailbox, or an alias that delivers to them: ``smtpd_sender_login_maps`` with
  ``reject_sender_login_mismatch`` on the envelope sender); the client's address and mail
  program are removed from the headers of submitted mail (a separate ``cleanup`` service
  with header checks). The maps are ``texthash:`` tables, read by Postfix itself: no
  ``postmap`` step that could leave a map out of date. Postfix also becomes the system's
  ``sendmail`` (the ``Sendmail`` role: with a mail server, msmtp is not installed).
- **Dovecot** serves IMAP over TLS on 993 only (143 is closed), stores Maildirs under
  ``/var/vmail/DOMAIN/USER`` as the ``vmail`` user, receives Postfix's mail over LMTP, runs
  the users' Sieve filters (Pigeonhole) and enforces a quota per mailbox (over it, LMTP
  refuses the message with a 5xx and Postfix bounces it with Dovecot's message; no grace:
  Dovecot 2.4 would otherwise let a message overrun the quota by up to 10 MB, 2.3 by 10 %). It also
  checks the submission logins for Postfix (SASL over a socket in Postfix's spool).
  Passwords are secret references, hashed with bcrypt on the deploying machine (Dovecot's
  ``BLF-CRYPT`` scheme) in a passwd-file readable by root and Dovecot only.
  Debian 12 ships Dovecot 2.3 and Debian 13 Dovecot 2.4, whose settings differ (``mail_path``
  and ``mail_driver`` for ``mail_location``, named ``passdb``/``userdb``/``quota`` blocks,
  ``%{user | domain}`` variables): the configuration is rendered for the target's release and
  checked by that release's ``doveconf`` before it replaces the live one.
- **DKIM**: OpenDKIM rather than rspamd. OpenDKIM does one thing (sign) with a small, stable
  configuration and Debian's own tools (``opendkim-genkey``); rspamd would also filter spam,
  but it brings Redis, a web interface and a much larger configuration whose defaults change
  between releases (spam filtering is SpamAssassin's, below). Keys are
  generated on the server (2048-bit RSA, ``/etc/opendkim/keys/DOMAIN/SELECTOR.private``) and
  never pass through the plan; each domain lists selectors, the first one signs and the
  others keep their keys (and DNS records) so a key can be rotated while mail signed with the
  old one is still in flight.
- **Spam filtering** (``spam_filter``, on by default) of inbound mail only (port 25, never
  the submission ports or local ``sendmail``): SpamAssassin's ``spamd`` with Debian's
  ``spamass-milter``, on Unix sockets (the milter's inside Postfix's chroot, like
  OpenDKIM's). Chosen over rspamd (which could filter as a milter without signing) because:
  it needs no Redis (rspamd's Bayes, greylisting and rate limits want one); its rules ship in
  the package (``/usr/share/spamassassin``) and score mail with no network at all (rspamd
  fetches maps from its project's servers at start and logs errors without them; ``sa-update``
  also needs the network, so Debian's daily ``spamassassin-maintenance`` timer updates the
  rules later and nothing at deploy time depends on it); its configuration (``required_score``,
  ``report_safe``, ``dns_available``) is the same in SpamAssassin 4.0.0 (Debian 12) and 4.0.1
  (Debian 13), where rspamd moves from 3.4 to 3.11. The cost is memory: measured on both
  releases, a spamd parent of 110-145 MB resident, each child about as much but mostly
  shared with it by copy-on-write, and 4 MB for the milter; ``max_children`` (2 by default)
  bounds the children. A message scoring at least
  ``junk_score`` (5) gets ``X-Spam-Flag: YES`` and a global Sieve script (Pigeonhole's
  *before* script, compiled with ``sievec``) files it into the user's Junk folder; one scoring
  at least ``reject_score`` (15) is refused during the SMTP dialogue (5.7.1), so nobody gets a
  bounce (no backscatter). Debian's ``spamass-milter`` has only an LSB script that needs the
  ``postfix`` user at install; the module gives it a systemd unit and installs it once
  Postfix is there. If the filter is down, mail is accepted unfiltered (Postfix's
  ``milter_default_action = accept``), never refused or lost.

- **Outbound limits** per logged-in user (``outbound_limits``: 30 messages a minute and 500
  a day by default): Debian's ``postfwd`` counts each message submitted on 587/465 per SASL
  login (Postfix asks it once per message, at the end of the data); over a limit the
  message is deferred with a 4xx reply, so the mail program keeps it and tries again later,
  and another user is not affected. A timer looks at Postfix's log every minute and mails
  root (the admin) who reached a limit (``mail-limits.sh``). If postfwd is down,
  submissions are deferred too (Postfix's default for an unreachable policy service):
  never let through uncounted. ``over_limit: hold`` puts the message on Postfix's hold
  queue instead (see below); ``defer`` stays the default for logged-in users because their
  mail program keeps the message, retries by itself and shows the user the reason.
- **Local programs' mail** (a web application, PHP's ``mail()``, cron: ``/usr/sbin/sendmail``,
  Postfix's ``pickup`` path, which policy services never see) is counted too, with the same
  limits, per envelope sender, and that sender is pinned to the Unix login:
  ``local_login_sender_maps`` (Postfix 3.6 or later: Debian 12 has 3.7, Debian 13 3.10) lets
  a login send only as ``LOGIN@SERVER-NAME`` (``root``, ``postfix`` and ``vmail``, Dovecot's
  Sieve redirects and vacation replies, may use any sender), so a sender is a login. ``pickup``
  hands each message (``content_filter``) to a second smtpd listening on
  ``127.0.0.1:10026`` only, which asks postfwd at the end of the data with the sender as the
  key and re-injects the message with no filter (no loop), no milter and no address mapping
  (both ran once, at pickup: the DKIM signature made there stays valid). Over a limit the
  message is **held** (postfwd answers ``HOLD``): it is already queued and no program is
  waiting to retry it, so deferring would only let the flood trickle out, each retry counted
  again; held mail stays in the queue (and across restarts of Postfix or the host: the hold
  queue is a directory of queue files) until the admin releases or deletes it with
  ``selfhost held``. The alert names the sender (the login) and, for PHP, the script
  (``X-PHP-Originating-Script``, from ``mail.add_x_header``) of the held messages.
- **First-time recipients per day** (``first_time_per_day``, 100 by default): postfwd
  (Debian's) keeps only rate counters in memory, each keyed by one request attribute, and no
  rule condition can ask "has this sender ever mailed this recipient", so this limit is a
  small policy service of our own (``mail_recipients.py``, Python's standard library only,
  installed as ``/usr/local/lib/selfhost/mail-recipients``; Debian ships none that does
  it). Postfix starts it per smtpd connection (``spawn`` in master.cf: no daemon to manage)
  as the unprivileged ``selfhost-mailrcpt`` user, whose private SQLite database
  (``/var/lib/selfhost-mail-recipients``, 0700, the file 0600) holds each (sender,
  recipient, first seen) pair. The submission ports and the local programs' smtpd ask it at
  RCPT time, for one recipient at a time (at the end of the data a message with several
  recipients has none in the request); the key is the login on 587/465, the envelope sender
  (pinned to the Unix login) on the local path. A recipient in the mail domains or the
  host's own name is not outbound: not counted; a pair already seen passes; a new pair is
  recorded, unless the sender already added ``first_time_per_day`` new recipients in the
  last 24 hours: then that recipient is deferred with a 4xx (``over_limit: hold``: the
  message is held) or, on the local path, the message is held, and the alert names the
  sender ("first-time recipients"). The other recipients of the message are not affected,
  and a refused pair is not recorded, so the retry of a deferred one counts once the window
  allows it. A new recipient is recorded when the RCPT is accepted, even if the message is
  refused later (another limit, a dropped connection): the count errs toward stricter.
  Fail safe like postfwd, never silently unlimited: if the script cannot run, dies or
  does not answer in time, Postfix's ``smtpd_policy_service_default_action`` (451 4.3.5)
  defers the recipient; if its database is locked for more than 10 s or broken, it answers
  451 4.3.0 itself. On the local path a 4xx at the loopback smtpd leaves the message in
  Postfix's queue, retried later: nothing is lost in either case.
- **MTA-STS** (RFC 8461) on public domains: the policy (mode, every MX, max age) is a static
  file under ``/var/www/selfhost-mta-sts/DOMAIN`` served at ``https://mta-sts.DOMAIN/`` by
  the web module, and the ``_mta-sts`` record's id is a hash of it, so that any change of the
  policy is a new id. ``testing`` by default: other servers report TLS failures (TLS-RPT, to
  ``postmaster@DOMAIN``) but still deliver; ``enforce`` is the admin's choice once the
  reports are clean, as a wrong policy would make them refuse to deliver.
- **Smarthost** (``relay``): for an access whose port 25 is blocked, every outgoing message
  goes to the smarthost on 587 (STARTTLS required) or 465 (TLS wrapper), its certificate
  checked by default (``secure``), with a SASL login from a root-only ``texthash`` table
  that Postfix reads before it drops privileges; the password is a secret reference filled
  in at deploy time (never in the plan, the logs or a command line).
- **Backup MX** (``backup_mx: {host: friend}``): another host of the fleet keeps the domains'
  mail while this server is down. The mail module sends that host a ``BackupMx`` request
  with the recipients its model accepts (mailboxes, aliases, catch-all domains), computed
  when the fleet is compiled; the host's :class:`BackupMxServer` makes its Postfix a relay
  for them only, and the backup is published as the second MX (preference 20). This server
  lists the backup's addresses in a client access table that passes them through the client
  checks (where RBL or greylisting checks belong: it has none yet), never in ``mynetworks``
  (which would let the backup relay through it). A backup host that runs its own mail
  service is refused at validation (both would own its Postfix).
- **Send-only accounts** (``send_only`` on a mailbox): a submission login that sends as its
  address (``smtpd_sender_login_maps``) with no Maildir. Port 25 refuses mail to it at RCPT
  (``check_recipient_access``, a 550: the sender's server tells its user, no bounce from
  here); it is in no userdb (LMTP has nowhere to deliver) and not among the backup MX's
  recipients; a catch-all maps it to itself, never to the catch-all's mailbox. Its password
  is in a passwd-file whose name ends with the login's service (``.smtp``): Dovecot finds
  it for Postfix's SASL logins only, an IMAP, POP3 or ManageSieve login fails like an
  unknown user (measured on 2.3 and 2.4 with ``doveadm auth test``), closed by default.
- **POP3S and ManageSieve**, off by default: ``pop3s`` adds Debian's ``dovecot-pop3d`` on
  995 (TLS from the first byte; the 110 listener is disabled), ``managesieve`` adds
  ``dovecot-managesieved`` on 4190, where ``ssl = required`` (and plaintext logins
  disabled) refuse AUTHENTICATE before STARTTLS. Each asks for its port and a health check
  and joins the ``dovecot`` jail's ports (Debian's filter matches ``pop3-login`` and
  ``managesieve-login`` lines), and its SRV record (RFC 6186, RFC 5804) is published.

- **Mailboxes asked by other modules** (``MailAccount``, e.g. an association's members):
  merged with the model's mailboxes and aliases (same passwd-file, quota, maps), their
  addresses checked at the requester's model path (in the mail domains, not taken by this
  model or another requester). An account with limits of its own gets postfwd rules of its
  own for its login and for its local Unix login's sender (the general rules skip both, a
  negative PCRE lookahead: postfwd ORs repeated items, so a list of ``!=`` would match
  everyone), and its own first-time recipients limit (``--limit SENDER=N``). With such
  accounts, the Maildirs are backed up one source per mailbox instead of ``/var/vmail``
  whole, each requested one in its requester's name (a member's restore is its own), and
  no Maildir in two sources.

The module asks for what it needs and names no other module: a certificate for the server's
name (the files appear under ``/etc/selfhost/tls/NAME/``; until the first export, a
self-signed placeholder lets the daemons start), the ports, the ``vmail`` system user, the
DNS records to publish (MX, SPF, DMARC, TLS-RPT, the SRV records mail programs read, and DKIM,
whose value is read on the server: ``DnsRecord.from_host``, used by ``selfhost dns`` and by
an authoritative DNS module on the same host), the MTA-STS policy host (a virtual host of the
web module), backup sources (the Maildirs: Maildir writes each message to a
new file and renames it, so a file-level copy is consistent message by message; and the DKIM
keys), fail2ban jails (Debian's ``postfix-sasl`` and ``dovecot`` filters, on the systemd
journal: the first also watches ``postfix@-.service``, where Postfix's daemons log and which
Debian 12's filter missed; the second adds Dovecot 2.4's "Login aborted ... (auth failed"
line, which Debian 13's filter missed), health checks and the sendmail role.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from selfhost.compose.module import Contribution, Env, Module, Problem
from selfhost.compose.requests import (
    BackupMx,
    BackupSource,
    Certificate,
    DnsRecord,
    HealthCheck,
    Jail,
    ListAddresses,
    LoopbackGuard,
    MailAccount,
    MailLimits,
    Port,
    Request,
    Sendmail,
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

VMAIL = "/var/vmail"
USERS = "/etc/dovecot/selfhost-users"
SEND_ONLY_USERS = "/etc/dovecot/selfhost-send-only.smtp"
"""The send-only accounts' passwd-file. Dovecot's passdb names it with the service of the
login (``selfhost-send-only.%s``): only Postfix's SASL logins (service ``smtp``) find this
file; an IMAP, POP3 or ManageSieve login looks for a file that does not exist and fails like
an unknown user (closed by default: no per-service deny list to forget)."""
SEND_ONLY = "/etc/postfix/selfhost-send-only"
"""Postfix's recipient access table: the send-only addresses, refused at RCPT on port 25."""
DOVECOT_CONF = "/etc/dovecot/dovecot.conf"
MAIN_CF = "/etc/postfix/main.cf"
MASTER_CF = "/etc/postfix/master.cf"
MAILBOXES = "/etc/postfix/selfhost-mailboxes"
ALIASES = "/etc/postfix/selfhost-aliases"
SENDERS = "/etc/postfix/selfhost-senders"
SUBMISSION_HEADERS = "/etc/postfix/selfhost-submission-headers"
LOCAL_SENDERS = "/etc/postfix/selfhost-local-senders"
OPENDKIM_CONF = "/etc/opendkim.conf"
DKIM_DIR = "/etc/opendkim"
DKIM_KEYS = "/etc/opendkim/keys"
KEY_TABLE = "/etc/opendkim/key.table"
SIGNING_TABLE = "/etc/opendkim/signing.table"
DKIM_SOCKET_DIR = "/var/spool/postfix/opendkim"
"""OpenDKIM's Unix socket lives here, inside Postfix's chroot (``unix:opendkim/...`` for
Postfix, relative to its queue directory). Not a TCP port on 127.0.0.1: Postfix's milter
protocol over TCP waited on Nagle's algorithm and delayed ACKs, about 44 ms per milter
exchange, 88 ms per submitted message (measured: 10 messages/s on one connection, 400 without
the milter)."""
DKIM_SOCKET = f"{DKIM_SOCKET_DIR}/opendkim.sock"
TLS_DIR = "/etc/selfhost/tls"
SPAM_CF = "/etc/spamassassin/selfhost.cf"
SPAMD_DROPIN = "/etc/systemd/system/spamd.service.d/selfhost.conf"
SPAMD_SOCKET = "/run/spamd/spamd.sock"
SPAMASS_UNIT = "/etc/systemd/system/spamass-milter.service"
SPAMASS_SOCKET_DIR = "/var/spool/postfix/spamass"
"""spamass-milter's Unix socket, inside Postfix's chroot (``unix:spamass/...`` for Postfix)."""
SPAM_SIEVE = "/etc/dovecot/sieve/selfhost-spam.sieve"
BACKUP_MX_CLIENTS = "/etc/postfix/selfhost-backup-mx.cidr"
RELAY_RECIPIENTS = "/etc/postfix/selfhost-relay-recipients"
RELAY_TRANSPORT = "/etc/postfix/selfhost-relay-transport"
LIST_TRANSPORT = "/etc/postfix/selfhost-list-transport"
"""The mailing lists' addresses -> the list manager's LMTP (from ``ListAddresses``)."""
RELAY_TLS = "/etc/postfix/selfhost-relay-tls"
RELAY_SENDERS = "/etc/postfix/selfhost-relay-senders"
RELAY_ALIASES = "/etc/postfix/selfhost-relay-aliases"
POSTFWD_CF = "/etc/postfix/postfwd.cf"
POSTFWD = "inet:127.0.0.1:10040"
LIMITS_ALERT = "/usr/local/sbin/selfhost-mail-limits"
LIMITS_UNIT = "/etc/systemd/system/selfhost-mail-limits.service"
LIMITS_TIMER = "/etc/systemd/system/selfhost-mail-limits.timer"
LIMIT_TEXT = "Outbound limit"
LOCAL_LOGINS = "/etc/postfix/selfhost-local-logins.regexp"
LOCAL_LIMIT_PORT = 10026
"""The loopback-only smtpd that counts the local programs' mail (``sendmail``): pickup hands
every message to it (``content_filter``), it asks postfwd, and re-injects the message."""
RECIPIENTS_SCRIPT = "/usr/local/lib/selfhost/mail-recipients"
RECIPIENTS_DIR = "/var/lib/selfhost-mail-recipients"
RECIPIENTS_DB = f"{RECIPIENTS_DIR}/recipients.sqlite"
RECIPIENTS_USER = "selfhost-mailrcpt"
RECIPIENTS_SERVICE = "selfhost-recipients"
"""The first-time recipients policy service: a master.cf ``spawn`` service (Postfix starts
the script per smtpd connection, as ``RECIPIENTS_USER``), asked at RCPT time over
``unix:private/selfhost-recipients``."""
LOCAL_ANY_SENDER = ("root", "postfix", "vmail")
"""Local logins that may send as anyone: the admin, Postfix itself, and Dovecot's Sieve (a
redirect keeps the original sender, a vacation reply sends as the mailbox)."""
SMARTHOST_PASSWORD = "/etc/postfix/selfhost-smarthost-password"
SMARTHOST_TLS = "/etc/postfix/selfhost-smarthost-tls"
MTA_STS_ROOT = "/var/www/selfhost-mta-sts"
"""Static roots of the MTA-STS policy hosts (``mta-sts.DOMAIN``), served by the web module."""

LOOPBACK_SMTPD = (
    "  -o smtpd_tls_security_level=none",
    "  -o smtpd_sasl_auth_enable=no",
    "  -o mynetworks=127.0.0.0/8",
    "  -o smtpd_client_restrictions=permit_mynetworks,reject",
    "  -o smtpd_helo_restrictions=",
    "  -o smtpd_sender_restrictions=",
    "  -o smtpd_relay_restrictions=permit_mynetworks,reject",
)
"""master.cf options of the loopback smtpd services that local programs (sendmail's pickup,
the list manager) hand their mail to: no TLS, no login, the loopback only."""

_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_DOMAIN = re.compile(rf"^{_LABEL}(\.{_LABEL})+$")
_LOCAL = re.compile(r"^[a-z0-9][a-z0-9._+-]{0,63}$")
_SELECTOR = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def maildir_home(address: str) -> str:
    """A mailbox's home, where Dovecot keeps its Maildir and Sieve scripts."""
    local, _, domain = address.partition("@")
    return f"{VMAIL}/{domain}/{local}"


def _valid_address(v: str) -> bool:
    try:
        _check_address(v)
    except ValueError:
        return False
    return True


def _others(keys: list[str]) -> str:
    """A postfwd pattern (PCRE, case-insensitive) that matches any non-empty value but
    ``keys`` (the logins whose limits are their own)."""
    if not keys:
        return "/./"
    return "/^(?!(?:" + "|".join(re.escape(k) for k in keys) + ")$)./"


def _public(domain: str) -> bool:
    """Whether ``domain`` can have a publicly trusted certificate (not a private suffix: the
    web module's list)."""
    return not any(domain == p or domain.endswith("." + p) for p in (
        "home.arpa", "lan", "local", "internal", "test", "example", "invalid", "localhost",
        "localdomain", "home", "corp"))


def _check_domain(v: str) -> str:
    v = v.lower().rstrip(".")
    if not _DOMAIN.match(v):
        raise ValueError(f"{v!r} is not a domain name (labels of a-z 0-9 '-', at least one dot)")
    return v


def _check_address(v: str) -> str:
    v = v.lower()
    local, sep, domain = v.partition("@")
    if not sep or not _LOCAL.match(local):
        raise ValueError(f"{v!r} is not a mail address (local part: a-z 0-9 . _ + -)")
    _check_domain(domain)
    return v


class MailDomain(StrictModel):
    """A domain this server receives and sends mail for."""

    name: str = Field(description="The domain, e.g. 'example.org' (addresses @example.org).")
    dkim_selectors: list[str] = Field(
        default_factory=lambda: ["mail"], min_length=1,
        description="DKIM selectors: the first signs outgoing mail; the others keep their key "
        "(and DNS record) while a rotation is under way. Each key is generated on the server.",
    )
    catch_all: str | None = Field(
        default=None,
        description="Deliver mail to unknown addresses of this domain to this mailbox (off by "
        "default: unknown addresses are refused, which also refuses most spam).",
    )
    dmarc_policy: Literal["none", "quarantine", "reject"] = Field(
        default="quarantine",
        description="The DMARC policy published for the domain (what receivers do with mail "
        "that fails SPF and DKIM).",
    )
    mta_sts: Literal["auto", "off", "testing", "enforce"] = Field(
        default="auto",
        description="MTA-STS (RFC 8461): a policy, served over HTTPS at mta-sts.DOMAIN by the "
        "web module, that tells other servers to deliver here over verified TLS only. "
        "'testing': they report failures (TLS-RPT) but still deliver; 'enforce': they refuse "
        "to deliver without valid TLS; 'auto' (default): 'testing' on a public domain, 'off' "
        "on a private one (home.arpa, .lan...: no public certificate). Switch to 'enforce' "
        "once the TLS reports are clean.",
    )
    tls_reports: str | None = Field(
        default=None,
        description="Where other servers send their daily TLS reports (TLS-RPT, RFC 8460: the "
        "_smtp._tls record); default postmaster@DOMAIN.",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_domain(v)

    @field_validator("catch_all", "tls_reports")
    @classmethod
    def _catch_all(cls, v: str | None) -> str | None:
        return None if v is None else _check_address(v)

    @field_validator("dkim_selectors")
    @classmethod
    def _selectors(cls, v: list[str]) -> list[str]:
        for s in v:
            if not _SELECTOR.match(s):
                raise ValueError(f"{s!r} is not a DKIM selector (a-z 0-9 '-')")
        if len(set(v)) != len(v):
            raise ValueError("a selector is listed twice")
        return v


class Mailbox(StrictModel):
    """A mailbox: an address that stores mail and logs in (IMAP, submission)."""

    address: str = Field(description="The address, which is also the login.")
    password: SecretRef = Field(
        description="Where the password is kept on the deploying machine ({env: VAR} or "
        "{file: PATH}); only a bcrypt hash reaches the server.",
    )
    quota_mb: int = Field(default=2048, ge=1, le=10_000_000,
                          description="Largest size of the mailbox (MB); mail beyond it is "
                          "refused with a clear bounce.")
    send_only: bool = Field(
        default=False,
        description="A send-only account (e.g. a 'noreply' address of an application): it "
        "logs in on submission (587/465) and sends as its address, but has no Maildir and "
        "receives nothing (mail to it is refused during the SMTP dialogue) and cannot log in "
        "over IMAP, POP3 or ManageSieve. No quota, no alias or catch-all pointing to it.")

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        return _check_address(v)


class MailAlias(StrictModel):
    """An address that forwards to others (mailboxes here, or addresses elsewhere)."""

    address: str = Field(description="The alias address (in one of the mail domains).")
    to: list[str] = Field(min_length=1, description="Where its mail goes.")

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        return _check_address(v)

    @field_validator("to")
    @classmethod
    def _to(cls, v: list[str]) -> list[str]:
        return [_check_address(a) for a in v]


class BackupMxSettings(StrictModel):
    """A backup MX: another host of the fleet that keeps the domains' mail while this server
    is down, and hands it over when it is back."""

    host: str = Field(description="The host of the fleet (its fleet name, host name or full "
                      "name) that is the backup MX, e.g. a friend's host. Its Postfix accepts "
                      "mail for the mail domains, only for their mailboxes and aliases, and "
                      "it is published as the second MX (preference 20).")
    queue_days: int = Field(default=10, ge=5, le=30,
                            description="How long the backup keeps trying to hand a message "
                            "over before it returns it to the sender (days).")


def postfix_basics(name: str, max_message_mb: int, aliases: str | None = None) -> list[str]:
    """The main.cf lines a primary and a backup MX share: names, networks, local aliases,
    the banner and VRFY, sizes (``aliases``: a virtual alias table, for the backup)."""
    return [
        "compatibility_level = 3.6",
        f"myhostname = {name}",
        "myorigin = $myhostname",
        "mydestination = $myhostname, localhost",
        "mynetworks = 127.0.0.0/8 [::1]/128",
        "inet_interfaces = all",
        "inet_protocols = all",
        "alias_maps = hash:/etc/aliases",
        "alias_database = hash:/etc/aliases",
        *([f"virtual_alias_maps = {aliases}"] if aliases else []),
        "recipient_delimiter = +",
        "biff = no",
        "append_dot_mydomain = no",
        "smtpd_banner = $myhostname ESMTP",
        "disable_vrfy_command = yes",
        "smtpd_helo_required = yes",
        f"message_size_limit = {max_message_mb * 1024 * 1024}",
        "mailbox_size_limit = 0",
    ]


class OutboundLimits(StrictModel):
    """How much mail one logged-in user may submit, or one local login send with sendmail: a
    stolen password or a hacked web form must not get the server blacklisted."""

    per_minute: int = Field(default=30, ge=1, le=100_000,
                            description="Messages one user may submit per minute. The next "
                            "ones are deferred (a 4xx reply: the mail program tries again "
                            "later, nothing is lost) and the admin is alerted.")
    per_day: int = Field(default=500, ge=1, le=10_000_000,
                         description="Messages one user may submit per 24 hours; beyond, "
                         "deferred and alerted as above.")
    over_limit: Literal["defer", "hold"] = Field(
        default="defer",
        description="What happens to a logged-in user's message over a limit: 'defer' (a "
        "4xx reply: the mail program keeps it and tries later, the user sees why) or 'hold' "
        "(accepted into Postfix's hold queue until the admin releases or deletes it with "
        "`selfhost held`). A local program's sendmail mail over a limit is always held.")
    first_time_per_day: int = Field(
        default=100, ge=1, le=1_000_000,
        description="New recipients (outside the server's mail domains, never mailed before "
        "by this user or local login) one user may add per 24 hours; a recipient already "
        "mailed always passes. Beyond, the message to the new recipient is deferred or held "
        "like one over the other limits, and the admin is alerted.")


class SpamFilter(StrictModel):
    """Spam filtering of inbound mail (port 25 only): SpamAssassin's spamd through
    spamass-milter, from Debian's packages."""

    enabled: bool = Field(default=True,
                          description="Filter inbound mail (on by default). It costs 150 to "
                          "250 MB of memory (spamd and its children): on a machine with less "
                          "than 1 GB, consider turning it off.")
    junk_score: float = Field(default=5.0, ge=1.0, le=100.0,
                              description="From this SpamAssassin score on, a message gets "
                              "'X-Spam-Flag: YES' and lands in the recipient's Junk folder.")
    reject_score: int = Field(default=15, ge=2, le=1000,
                              description="From this score on, a message is refused during "
                              "the SMTP dialogue (5xx: the sending server tells its user; no "
                              "bounce from here). Higher than junk_score.")
    network_checks: bool = Field(default=True,
                                 description="Let SpamAssassin ask DNS block lists and look up "
                                 "DKIM/SPF records (off: only the rules shipped in the "
                                 "package, with no network at all, e.g. on an isolated test "
                                 "network).")
    max_children: int = Field(default=2, ge=1, le=10,
                              description="Most spamd child processes scanning at once (each "
                              "adds some memory; more wait in line).")


class MailRelay(StrictModel):
    """A smarthost: the provider's (or a friend's) SMTP server that sends this server's
    outgoing mail, for an Internet access whose port 25 is blocked. Postfix logs in (SASL)
    over TLS only: STARTTLS required on 587, TLS from the first byte on 465."""

    host: str = Field(description="The smarthost's name, e.g. 'smtp.provider.net'.")
    port: int = Field(default=587, description="587 (submission, STARTTLS required) or 465 "
                      "(submissions, TLS from the first byte).")
    username: str = Field(min_length=1, max_length=255,
                          description="The login at the smarthost.")
    password: SecretRef = Field(
        description="Where the login's password is kept on the deploying machine ({env: VAR} "
        "or {file: PATH}): it is written only into a root-only table on the server "
        "(never in the plan, the logs or a command line).")
    verify_certificate: bool = Field(
        default=True,
        description="Check the smarthost's certificate against the system's CAs and its name "
        "(Postfix's 'secure' level). Turn off only for a smarthost with a private "
        "certificate: the connection is then still encrypted ('encrypt' level) but a machine "
        "in the middle could read the password.")
    spf_include: str | None = Field(
        default=None,
        description="The smarthost's SPF domain, added to the domains' SPF records as "
        "'include:DOMAIN' (e.g. '_spf.provider.net'): mail relayed by it then passes SPF.")

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        return _check_domain(v)

    @field_validator("spf_include")
    @classmethod
    def _spf(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"(_?[a-z0-9-]{1,63}\.)+[a-z0-9-]{2,63}", v):
            raise ValueError(f"{v!r} is not a domain name (e.g. '_spf.provider.net')")
        return v

    @field_validator("port")
    @classmethod
    def _port(cls, v: int) -> int:
        if v not in (587, 465):
            raise ValueError("the smarthost's port is 587 (STARTTLS) or 465 (TLS): port 25 "
                             "would let the password travel without TLS")
        return v

    @field_validator("username")
    @classmethod
    def _username(cls, v: str) -> str:
        if any(c.isspace() for c in v):
            raise ValueError("a login without spaces")
        return v


class MailService(Service):
    """A mail server: SMTP (Postfix), IMAP (Dovecot), DKIM signing (OpenDKIM)."""

    kind: ClassVar[str] = "mail"
    provides: ClassVar[tuple[type[Request], ...]] = (MailAccount, ListAddresses)
    uses: ClassVar[tuple[type[Request], ...]] = (Certificate, Port, SystemUser, BackupSource,
                                                 Jail, HealthCheck, DnsRecord, Sendmail,
                                                 BackupMx, VirtualHost, LoopbackGuard)

    domains: list[MailDomain] = Field(min_length=1, description="The mail domains.")
    mailboxes: list[Mailbox] = Field(default_factory=list, description="The mailboxes.")
    aliases: list[MailAlias] = Field(default_factory=list, description="The aliases.")
    max_message_mb: int = Field(default=25, ge=1, le=1024,
                                description="Largest message accepted (MB).")
    outbound_limits: OutboundLimits = Field(
        default_factory=OutboundLimits,
        description="Limits on the mail each logged-in user submits (counted per login by "
        "postfwd, on the submission ports) and each local login sends with sendmail (counted "
        "per sender, which is pinned to the login; held over a limit), and on the new outside "
        "recipients each of them adds per day (a policy service of the module).")
    spam_filter: SpamFilter = Field(
        default_factory=SpamFilter,
        description="Spam filtering of inbound mail on port 25 (SpamAssassin; never on "
        "submission): a likely spam goes to the Junk folder, a certain one is refused.")
    backup_mx: BackupMxSettings | None = Field(
        default=None,
        description="A backup MX on another host of the fleet (none by default): it accepts "
        "mail for the domains' existing recipients only (no backscatter), queues it while this "
        "server is down and delivers it here when it is back.")
    relay: MailRelay | None = Field(
        default=None,
        description="Send outgoing mail through a smarthost (none by default: straight to the "
        "recipients' servers on port 25). For an Internet access whose port 25 is blocked.")
    pop3s: bool = Field(
        default=False,
        description="Also serve POP3 over TLS on port 995 (Debian's dovecot-pop3d; TLS from "
        "the first byte; plaintext POP3 on 110 stays closed). Off by default: IMAP (993) "
        "serves every mail program.")
    managesieve: bool = Field(
        default=False,
        description="Let users manage their Sieve filters from their mail program "
        "(ManageSieve, RFC 5804, port 4190, Debian's dovecot-managesieved; STARTTLS required "
        "before login). Off by default: filters still run, the admin places them.")

    def backup_host(self, env: Env) -> str | None:
        """The fleet name of the backup MX host (None: none, or not a valid other host)."""
        if self.backup_mx is None:
            return None
        found = env.fleet.find(self.backup_mx.host)
        return found if found is not None and found != env.host else None

    def recipients(self) -> list[str]:
        """Every address this server accepts mail for: mailboxes, aliases, and ``@domain``
        for a domain with a catch-all (the backup MX accepts these, and only these)."""
        out = {m.address for m in self.mailboxes if not m.send_only}
        out |= {a.address for a in self.aliases}
        out |= {f"@{d.name}" for d in self.domains if d.catch_all is not None}
        return sorted(out)

    def send_only(self) -> list[str]:
        """The send-only accounts' addresses, sorted."""
        return sorted(m.address for m in self.mailboxes if m.send_only)

    def send_only_problems(self, env: Env) -> list[Problem]:
        """Send-only accounts receive nothing: no quota on them, and no alias, catch-all,
        TLS-report or admin address pointing to them (that mail would be refused)."""
        base: tuple[str | int, ...] = ("services", "mail")
        senders = set(self.send_only())
        out: list[Problem] = []
        for i, m in enumerate(self.mailboxes):
            if m.send_only and "quota_mb" in m.model_fields_set:
                out.append(Problem((*base, "mailboxes", i, "quota_mb"), f"{m.address} is "
                                   "send-only: it stores no mail, a quota means nothing"))
        for i, a in enumerate(self.aliases):
            for j, to in enumerate(a.to):
                if to in senders:
                    out.append(Problem((*base, "aliases", i, "to", j), f"{to} is send-only "
                                       f"(it receives nothing): mail to {a.address} would be "
                                       "refused"))
        for i, d in enumerate(self.domains):
            if d.catch_all in senders:
                out.append(Problem((*base, "domains", i, "catch_all"), f"catch-all target "
                                   f"{d.catch_all} is send-only (it receives nothing)"))
            if d.tls_reports in senders:
                out.append(Problem((*base, "domains", i, "tls_reports"), f"{d.tls_reports} "
                                   "is send-only: the TLS reports sent to it would be refused"))
        notify = env.server.notify
        if notify is not None and notify.email.lower() in senders:
            out.append(Problem(("notify", "email"), f"{notify.email} is a send-only account "
                               "of the mail server: the admin's mail would be refused"))
        for i, admin in enumerate(env.server.admins):
            if admin.email is not None and admin.email.lower() in senders:
                out.append(Problem(("admins", i, "email"), f"{admin.email} is a send-only "
                                   "account of the mail server: the alerts would be refused"))
        return out

    # ------------------------------------------------------------------ other modules' mailboxes

    def full_address(self, address: str) -> str:
        """A requested address in full: a bare local part is in the first mail domain."""
        a = address.lower()
        return a if "@" in a else f"{a}@{self.domains[0].name}"

    def accounts(self, env: Env) -> list[tuple[str, MailAccount]]:
        """The mailboxes other modules asked for (:class:`MailAccount`), with their full
        addresses, sorted."""
        return sorted(((self.full_address(r.address), r) for r in env.incoming(MailAccount)),
                      key=lambda p: p[0])

    def account_addresses(self, env: Env) -> set[str]:
        """Every address the requested accounts receive: their mailboxes and aliases."""
        out: set[str] = set()
        for addr, r in self.accounts(env):
            out.add(addr)
            out |= {self.full_address(a) for a in r.aliases}
        return out

    def with_accounts(self, env: Env) -> MailService:
        """This service with the requested accounts among its mailboxes and aliases (one
        passwd-file, one quota mechanism, one set of maps): what is rendered. An invalid
        address is left out (the assertions report it)."""
        accounts = [(a, r) for a, r in self.accounts(env) if _valid_address(a)]
        if not accounts:
            return self
        boxes = [Mailbox(address=a, password=r.password, quota_mb=r.quota_mb)
                 for a, r in accounts]
        aliases = [MailAlias(address=self.full_address(al), to=[a]) for a, r in accounts
                   for al in r.aliases if _valid_address(self.full_address(al))]
        return self.model_copy(update={"mailboxes": [*self.mailboxes, *boxes],
                                       "aliases": [*self.aliases, *aliases]})

    def own_limits(self, env: Env) -> list[tuple[str, bool, MailLimits, str]]:
        """(key, local, limits, owner) of the requested accounts with limits of their own:
        the SASL login (key: the address), and the local login (key: its sender,
        LOGIN@server), each with every window resolved (the server's limit where the request
        has none)."""
        lim = self.outbound_limits
        fqdn = env.server.fqdn.lower()
        out: list[tuple[str, bool, MailLimits, str]] = []
        seen: set[str] = set()
        for addr, r in self.accounts(env):
            if r.limits is None or not _valid_address(addr):
                continue
            limits = MailLimits(
                r.limits.per_minute or lim.per_minute, r.limits.per_day or lim.per_day,
                r.limits.first_time_per_day or lim.first_time_per_day)
            owner = r.owner or addr
            out.append((addr, False, limits, owner))
            if r.local_login and f"{r.local_login}@{fqdn}" not in seen:
                seen.add(f"{r.local_login}@{fqdn}")
                out.append((f"{r.local_login}@{fqdn}", True, limits, owner))
        return out

    @staticmethod
    def limit_windows(limits: MailLimits | OutboundLimits) -> list[tuple[str, int, int, str]]:
        """(rule id suffix, count, seconds, wording) of the per-minute and per-day windows."""
        assert limits.per_minute is not None and limits.per_day is not None
        return [("MINUTE", limits.per_minute, 60, f"{limits.per_minute} per minute"),
                ("DAY", limits.per_day, 86400, f"{limits.per_day} per day")]

    def maildir_backups(self, env: Env) -> list[Request]:
        """Backup sources of the Maildirs: the whole of /var/vmail, or, when other modules
        asked for mailboxes, one source per mailbox (the requested ones in their requester's
        name, e.g. an association's member: that member's restore touches no other mail),
        so that no Maildir is in two sources."""
        accounts = [(a, r) for a, r in self.accounts(env) if _valid_address(a)]
        if not accounts:
            return [BackupSource(VMAIL)]
        own = sorted(m.address for m in self.mailboxes if not m.send_only)
        return [*(BackupSource(maildir_home(a)) for a in own),
                *(BackupSource(maildir_home(a), origin=r.origin) for a, r in accounts)]

    def account_problems(self, env: Env) -> list[Problem]:
        """The requested accounts, at the requester's model paths: addresses in the mail
        domains, none taken twice (this model's mailboxes and aliases, another request's)."""
        from selfhost.compose.route import loc_of

        domains = [d.name for d in self.domains]
        taken: dict[str, tuple[str | int, ...]] = {}
        for i, m in enumerate(self.mailboxes):
            taken.setdefault(m.address, ("services", "mail", "mailboxes", i, "address"))
        for i, a in enumerate(self.aliases):
            taken.setdefault(a.address, ("services", "mail", "aliases", i, "address"))
        out: list[Problem] = []
        for r in env.incoming(MailAccount):
            wanted = [(self.full_address(r.address), loc_of(r.origin))]
            wanted += [(self.full_address(a), (*loc_of(r.aliases_origin or r.origin), j))
                       for j, a in enumerate(r.aliases)]
            for addr, loc in wanted:
                if not _valid_address(addr):
                    out.append(Problem(loc, f"{addr!r} is not a mail address (local part: "
                                       "a-z 0-9 . _ + -)"))
                elif addr.split("@")[1] not in domains:
                    out.append(Problem(loc, f"{addr}: {addr.split('@')[1]} is not one of the "
                                       f"mail domains ({', '.join(domains)})"))
                elif addr in taken:
                    other = taken[addr]
                    whose = ("the mail service's" if other[:2] == ("services", "mail")
                             else "another")
                    out.append(Problem(loc, f"{addr} is already {whose} mailbox or alias "
                                       f"({'.'.join(str(p) for p in other)})", other=other))
                else:
                    taken[addr] = loc
        return out

    # ------------------------------------------------------------------ model checks

    def assertions(self, env: Env) -> list[Problem]:
        base: tuple[str | int, ...] = ("services", "mail")
        out: list[Problem] = []
        domains = [d.name for d in self.domains]
        boxes = [m.address for m in self.mailboxes]
        receiving = [m.address for m in self.mailboxes if not m.send_only]
        alias_names = [a.address for a in self.aliases]
        fqdn = env.server.fqdn.lower()
        if not _DOMAIN.match(fqdn):
            out.append(Problem(("hostname",), f"the mail server's name {fqdn!r} cannot have a "
                               "certificate (not a valid host name)"))
        for i, d in enumerate(self.domains):
            if domains.index(d.name) != i:
                out.append(Problem((*base, "domains", i, "name"), f"domain {d.name} is listed "
                                   "twice"))
            if d.name == fqdn:
                out.append(Problem((*base, "domains", i, "name"), f"{d.name} is the server's own "
                                   "name (its local mail): use the domain above it"))
            if d.catch_all is not None:
                if not any(b.endswith("@" + d.name) for b in receiving):
                    out.append(Problem((*base, "domains", i, "catch_all"), f"catch-all on "
                                       f"{d.name}, which has no mailbox"))
                elif d.catch_all not in boxes:
                    out.append(Problem((*base, "domains", i, "catch_all"), f"catch-all target "
                                       f"{d.catch_all} is not a mailbox"))
        for i, m in enumerate(self.mailboxes):
            if boxes.index(m.address) != i:
                out.append(Problem((*base, "mailboxes", i, "address"), f"mailbox {m.address} "
                                   "is listed twice"))
            if m.address.split("@")[1] not in domains:
                out.append(Problem((*base, "mailboxes", i, "address"), f"{m.address}: "
                                   f"{m.address.split('@')[1]} is not one of the mail domains "
                                   f"({', '.join(domains)})"))
        for i, a in enumerate(self.aliases):
            where = (*base, "aliases", i)
            if a.address in boxes:
                out.append(Problem((*where, "address"), f"{a.address} is both a mailbox and an "
                                   "alias"))
            elif alias_names.index(a.address) != i:
                out.append(Problem((*where, "address"), f"alias {a.address} is listed twice"))
            if a.address.split("@")[1] not in domains:
                out.append(Problem((*where, "address"), f"{a.address}: not in one of the mail "
                                   f"domains ({', '.join(domains)})"))
            for j, t in enumerate(a.to):
                if (t.split("@")[1] in domains and t not in boxes and t not in alias_names
                        and t not in self.account_addresses(env)):
                    out.append(Problem((*where, "to", j), f"{t} is in a mail domain of this "
                                       "server but is no mailbox or alias: mail to "
                                       f"{a.address} would bounce"))
        spam = self.spam_filter
        if spam.enabled and spam.reject_score <= spam.junk_score:
            out.append(Problem((*base, "spam_filter", "reject_score"), f"reject_score "
                               f"{spam.reject_score} must be higher than junk_score "
                               f"{spam.junk_score} (else no message would reach Junk)"))
        for i, d in enumerate(self.domains):
            if d.mta_sts in ("testing", "enforce") and not _public(d.name):
                out.append(Problem((*base, "domains", i, "mta_sts"), f"{d.name} is a private "
                                   "name: other servers could not check the certificate of "
                                   f"mta-sts.{d.name} (use 'auto' or 'off')"))
        if self.backup_mx is not None:
            where = (*base, "backup_mx", "host")
            found = env.fleet.find(self.backup_mx.host)
            if found is None:
                out.append(Problem(where, f"no host {self.backup_mx.host!r} in this fleet "
                                   f"(hosts: {', '.join(sorted(env.fleet.hosts))})"))
            elif found == env.host:
                out.append(Problem(where, "a mail server cannot be its own backup MX"))
            else:
                other = env.fleet.hosts[found]
                svc = getattr(other.services, "mail", None)
                if svc is not None and svc.enabled:
                    out.append(Problem(where, f"{found} runs a mail server of its own: a "
                                       "backup MX on a host with a mail service is not "
                                       "supported yet (both would own its Postfix); choose "
                                       "a host without one"))
                if not _DOMAIN.match(other.fqdn.lower()):
                    out.append(Problem(where, f"the backup MX's name {other.fqdn!r} is not a "
                                       "valid host name (it is published as an MX)"))
        return (out + self.send_only_problems(env) + self.account_problems(env)
                + self.list_problems(env))

    # ------------------------------------------------------------------ requests

    def requests(self, env: Env) -> list[Request]:
        merged = self.with_accounts(env)
        name = env.server.fqdn
        out: list[Request] = [
            Certificate((name,), reload=("postfix.service", "dovecot.service"),
                        origin=f"{env.path}"),
            Port(25, "tcp", "internet", comment="SMTP (mail from other servers)"),
            Port(465, "tcp", "internet", comment="SMTP submission over TLS"),
            Port(587, "tcp", "internet", comment="SMTP submission (STARTTLS)"),
            Port(993, "tcp", "internet", comment="IMAP over TLS"),
            SystemUser("vmail", home=VMAIL),
            SystemUser(RECIPIENTS_USER, home=RECIPIENTS_DIR),
            *self.maildir_backups(env),
            BackupSource(DKIM_KEYS),
            # Postfix's daemons log under postfix@-.service (postfix.service only starts that
            # instance): Debian 12's fail2ban filter matches postfix.service only, so the jail
            # saw no failed login there. Both units, as Debian 13's filter has it.
            Jail("postfix-sasl", port="smtp,465,submission",
                 journalmatch="_SYSTEMD_UNIT=postfix.service _SYSTEMD_UNIT=postfix@-.service"),
            # Debian 13's fail2ban filter misses Dovecot 2.4's failed-login line: ours adds it.
            Jail("dovecot", port=",".join(["imaps", *self.optional_jail_ports()]),
                 filter="selfhost-dovecot",
                 filter_definition=DOVECOT_FILTER),
            HealthCheck("unit", "postfix.service"),
            HealthCheck("unit", "dovecot.service"),
            HealthCheck("unit", "opendkim.service"),
            HealthCheck("unit", "postfwd.service"),
            HealthCheck("tcp", "127.0.0.1:10040"),
            HealthCheck("tcp", f"127.0.0.1:{LOCAL_LIMIT_PORT}"),
            HealthCheck("tcp", "127.0.0.1:25"),
            HealthCheck("tcp", "127.0.0.1:993"),
            *self.optional_requests(),
            *([HealthCheck("unit", "spamd.service"), HealthCheck("unit", "spamass-milter.service")]
              if self.spam_filter.enabled else []),
            # Mail that cannot leave (a blocked port 25, a relay refusing) piles up here.
            HealthCheck("mailqueue", "postfix", "20"),
            Sendmail("postfix"),
        ]
        out += self.domain_records(env)
        out += self.list_requests(env)
        backup = self.backup_host(env)
        if backup is not None and self.backup_mx is not None:
            origin = f"{env.path}.backup_mx"
            names = tuple(d.name for d in self.domains)
            out.append(BackupMx(backup, name, names, tuple(merged.recipients()),
                                reject_senders=names, queue_days=self.backup_mx.queue_days,
                                max_message_mb=self.max_message_mb, origin=origin))
            out += [DnsRecord(d, "MX", f"20 {env.fleet.hosts[backup].fqdn}.", origin=origin)
                    for d in names]
        return out

    # ------------------------------------------------------------------ DNS, MTA-STS, clients

    def mta_sts_mode(self, d: MailDomain) -> str:
        """The domain's MTA-STS mode ('off', 'testing' or 'enforce'): 'auto' is 'testing' on a
        public domain, 'off' on a private one (no public certificate for mta-sts.DOMAIN)."""
        if d.mta_sts != "auto":
            return d.mta_sts
        return "testing" if _public(d.name) else "off"

    def mx_names(self, env: Env) -> list[str]:
        """The MX hosts of the domains: this server, then the backup MX."""
        backup = self.backup_host(env)
        return [env.server.fqdn] + ([env.fleet.hosts[backup].fqdn] if backup else [])

    def mta_sts_policy(self, env: Env, d: MailDomain) -> str:
        """The MTA-STS policy file of ``d`` (RFC 8461): the mode, every MX, a week's cache
        (a day while testing, so that a switch to 'enforce' or a new MX spreads fast)."""
        mode = self.mta_sts_mode(d)
        age = 604800 if mode == "enforce" else 86400
        return "".join(["version: STSv1\r\n", f"mode: {mode}\r\n",
                        *(f"mx: {n}\r\n" for n in self.mx_names(env)),
                        f"max_age: {age}\r\n"])

    def domain_records(self, env: Env) -> list[Request]:
        """Each domain's DNS records (MX, SPF, DMARC, DKIM, MTA-STS, TLS-RPT, the SRV records
        of RFC 6186/8314 that mail programs read to find the server) and the MTA-STS policy
        host, a virtual host of the web module."""
        name = env.server.fqdn
        spf = "v=spf1 mx" + (f" include:{self.relay.spf_include}"
                             if self.relay is not None and self.relay.spf_include else "")
        out: list[Request] = []
        for i, d in enumerate(self.domains):
            origin = f"{env.path}.domains.{i}"
            out += [
                DnsRecord(d.name, "MX", f"10 {name}.", origin=origin),
                DnsRecord(d.name, "TXT", f'"{spf} -all"', origin=origin),
                DnsRecord(f"_dmarc.{d.name}", "TXT",
                          f'"v=DMARC1; p={d.dmarc_policy}; adkim=s; aspf=s"', origin=origin),
                DnsRecord(f"_smtp._tls.{d.name}", "TXT",
                          f'"v=TLSRPTv1; rua=mailto:{d.tls_reports or "postmaster@" + d.name}"',
                          origin=origin),
                DnsRecord(f"_submissions._tcp.{d.name}", "SRV", f"0 1 465 {name}.",
                          origin=origin),
                DnsRecord(f"_submission._tcp.{d.name}", "SRV", f"0 1 587 {name}.",
                          origin=origin),
                DnsRecord(f"_imaps._tcp.{d.name}", "SRV", f"0 1 993 {name}.", origin=origin),
                # RFC 6186: a target of "." says the service is not offered (plain IMAP, POP3).
                DnsRecord(f"_imap._tcp.{d.name}", "SRV", "0 0 0 .", origin=origin),
                DnsRecord(f"_pop3._tcp.{d.name}", "SRV", "0 0 0 .", origin=origin),
                DnsRecord(f"_pop3s._tcp.{d.name}", "SRV",
                          f"0 1 995 {name}." if self.pop3s else "0 0 0 .", origin=origin),
                *([DnsRecord(f"_sieve._tcp.{d.name}", "SRV", f"0 1 4190 {name}.",
                             origin=origin)] if self.managesieve else []),
            ]
            for s in d.dkim_selectors:
                txt = f"{DKIM_KEYS}/{d.name}/{s}.txt"
                out.append(DnsRecord(
                    f"{s}._domainkey.{d.name}", "TXT", '"v=DKIM1; k=rsa; p=<public key>"',
                    note=f"the DKIM key is generated on the server ({txt})",
                    # opendkim-genkey's zone-file fragment: the quoted strings of each line.
                    from_host=f"sed -n 's/^[^\"]*\\(\".*\"\\)[^\"]*$/\\1/p' {txt}",
                    origin=origin))
            if self.mta_sts_mode(d) != "off":
                policy = self.mta_sts_policy(env, d)
                sts_id = hashlib.sha256(policy.encode()).hexdigest()[:20]
                out += [
                    DnsRecord(f"_mta-sts.{d.name}", "TXT", f'"v=STSv1; id={sts_id}"',
                              origin=f"{origin}.mta_sts"),
                    VirtualHost(f"mta-sts.{d.name}", root=f"{MTA_STS_ROOT}/{d.name}",
                                origin=f"{origin}.mta_sts"),
                ]
        return out

    def mta_sts_files(self, env: Env) -> tuple[list[ManagedDir], list[ManagedFile]]:
        dirs: list[ManagedDir] = []
        files: list[ManagedFile] = []
        for d in self.domains:
            if self.mta_sts_mode(d) == "off":
                continue
            root = f"{MTA_STS_ROOT}/{d.name}"
            if not dirs:
                dirs.append(ManagedDir(MTA_STS_ROOT, "0755"))
            dirs += [ManagedDir(root, "0755"), ManagedDir(f"{root}/.well-known", "0755")]
            files.append(ManagedFile(f"{root}/.well-known/mta-sts.txt",
                                     self.mta_sts_policy(env, d), mode="0644"))
        return dirs, files

    # ------------------------------------------------------------------ smarthost relay

    def relay_settings(self) -> list[str]:
        """main.cf lines that send the outgoing mail through the smarthost (none without)."""
        r = self.relay
        if r is None:
            return []
        return [
            "# Outgoing mail through the smarthost (port 25 blocked): TLS required, then a",
            "# login from a root-only table (read by Postfix before it drops privileges).",
            f"relayhost = [{r.host}]:{r.port}",
            "smtp_host_lookup = dns, native",
            "smtp_sasl_auth_enable = yes",
            f"smtp_sasl_password_maps = texthash:{SMARTHOST_PASSWORD}",
            "smtp_sasl_security_options = noanonymous",
            "smtp_sasl_tls_security_options = noanonymous",
            f"smtp_tls_policy_maps = texthash:{SMARTHOST_TLS}",
            *(["smtp_tls_wrappermode = yes"] if r.port == 465 else []),
            "",
        ]

    def relay_files(self) -> list[ManagedFile]:
        r = self.relay
        if r is None:
            return []
        head = "# Managed by selfhost: changes here are overwritten on the next deploy.\n"
        level = "secure" if r.verify_certificate else "encrypt"
        return [
            ManagedFile(SMARTHOST_TLS, head + f"[{r.host}]:{r.port} {level}\n", mode="0644"),
            ManagedFile(SMARTHOST_PASSWORD,
                        head + f"[{r.host}]:{r.port} {r.username}:{SECRET_MARK.format(0)}\n",
                        mode="0600", secrets=(SecretPiece(r.password),)),
        ]

    def backup_clients(self, env: Env) -> list[str]:
        """The backup MX's addresses (from the model), as Postfix CIDR networks."""
        backup = self.backup_host(env)
        if backup is None:
            return []
        return [f"{a}/{32 if a.version == 4 else 128}"
                for a in env.fleet.hosts[backup].addresses.public
                + env.fleet.hosts[backup].addresses.lan]

    # ------------------------------------------------------------------ Postfix

    def main_cf(self, env: Env) -> str:
        name = env.server.fqdn
        tls = f"{TLS_DIR}/{name}"
        return "\n".join([
            "# Managed by selfhost: changes here are overwritten on the next deploy.",
            *postfix_basics(name, self.max_message_mb),
            "",
            "# The mail domains: mailboxes delivered to Dovecot over LMTP.",
            "virtual_mailbox_domains = " + ", ".join(d.name for d in self.domains),
            f"virtual_mailbox_maps = texthash:{MAILBOXES}"
            + (f", texthash:{LIST_TRANSPORT}" if self.lists(env) else ""),
            f"virtual_alias_maps = texthash:{ALIASES}",
            "virtual_transport = lmtp:unix:private/dovecot-lmtp",
            *self.lists_main_cf(env),
            f"smtpd_sender_login_maps = texthash:{SENDERS}",
            "",
            *_tls_settings(tls),
            "",
            "# Port 25: no login (submission only); mail for the mail domains, no relaying;",
            "# mail from the mail domains comes through submission, never from outside.",
            "smtpd_sasl_auth_enable = no",
            "smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, "
            "reject_unauth_destination",
            "smtpd_sender_restrictions = reject_non_fqdn_sender, permit_mynetworks, "
            f"check_sender_access texthash:{LOCAL_SENDERS}",
            *self.send_only_main_cf(),
            "",
            *([
                "# The backup MX hands over the mail it kept: its addresses pass the client",
                "# checks (the place for RBL or greylisting checks, which must not delay it),",
                "# and nothing else (it is not in mynetworks: it may not relay through here).",
                f"smtpd_client_restrictions = check_client_access cidr:{BACKUP_MX_CLIENTS}",
                "",
            ] if self.backup_clients(env) else []),
            *self.relay_settings(),
            "# DKIM signing (OpenDKIM), for submitted mail and the system's own.",
            "smtpd_milters = unix:opendkim/opendkim.sock",
            "non_smtpd_milters = unix:opendkim/opendkim.sock",
            "milter_default_action = accept",
            "",
            *self.local_limits_main_cf(),
            *self.first_time_main_cf(),
        ])

    # ------------------------------------------------------------------ local sendmail limits

    def local_limits_main_cf(self) -> list[str]:
        """main.cf lines of the local programs' limits: each login sends as itself."""
        return [
            "# Local programs' mail (sendmail): a login sends only as LOGIN@this server",
            "# (root and Dovecot's vmail as anyone), so its sender names who sent it.",
            f"local_login_sender_maps = inline:{{ {', '.join(f'{u}=*' for u in LOCAL_ANY_SENDER)} "
            f"}}, regexp:{LOCAL_LOGINS}",
            "",
        ]

    def local_limits_master_cf(self) -> list[str]:
        """master.cf lines: pickup hands each message to a loopback smtpd that asks postfwd
        (sender as the key) and re-injects it once, unfiltered."""
        return [
            "# Local programs' mail: pickup hands it to the loopback smtpd below, which asks",
            "# postfwd (outbound limits, held over them) and queues it again, unfiltered.",
            "pickup    unix  n       -       y       60      1       pickup",
            f"  -o content_filter=selfhost-limit:[127.0.0.1]:{LOCAL_LIMIT_PORT}",
            "selfhost-limit unix -   -       y       -       4       smtp",
            "  -o syslog_name=postfix/selfhost-limit",
            "  -o smtp_tls_security_level=none",
            f"127.0.0.1:{LOCAL_LIMIT_PORT} inet n -     y       -       4       smtpd",
            "  -o syslog_name=postfix/local-limit",
            "  -o content_filter=",
            "  -o receive_override_options=no_unknown_recipient_checks,no_header_body_checks,"
            "no_milters,no_address_mappings",
            "  -o smtpd_milters=",
            *LOOPBACK_SMTPD,
            self.first_time_restrictions(),
            f"  -o {{ smtpd_end_of_data_restrictions = check_policy_service {POSTFWD} }}",
        ]

    def local_limits_maps(self, env: Env) -> dict[str, str]:
        """The login -> allowed sender table (regexp: every other login sends as itself)."""
        head = "# Managed by selfhost: changes here are overwritten on the next deploy.\n"
        return {LOCAL_LOGINS: head + "# A local login sends as LOGIN@this server only (or as"
                " bare LOGIN, sendmail's default,\n# which Postfix completes the same way).\n"
                f"/^([a-z_][a-z0-9_.-]*)$/ $1 $1@{env.server.fqdn.lower()}\n"}

    def local_limits_postfwd(self, own: list[tuple[str, bool, MailLimits, str]] | None = None
                             ) -> list[str]:
        """postfwd's rules for the loopback smtpd: per sender, held over a limit (the local
        logins with limits of their own first)."""
        lim = self.outbound_limits
        lines = ["# Local programs' mail (the loopback smtpd, port "
                 f"{LOCAL_LIMIT_PORT}): per sender (a login), held over a limit."]
        senders = [key for key, local, _, _ in own or [] if local]
        for n, (key, local, limits, owner) in enumerate(own or []):
            if not local:
                continue
            for rid, count, seconds, what in self.limit_windows(limits):
                lines.append(f"id=SELFHOST_LOCAL_ACCOUNT_{n}_{rid}; "
                             f"protocol_state==END-OF-MESSAGE; server_port=={LOCAL_LIMIT_PORT}; "
                             f"sender=={key}; action=rate(sender/{count}/{seconds}/HOLD "
                             f"{LIMIT_TEXT}: $$sender ({owner}) may send {what}, held for the "
                             "admin)")
        return lines + self.held_per_sender("SELFHOST_LOCAL_{rid}", LOCAL_LIMIT_PORT,
                                            f"=~{_others(senders)}", lim)

    def held_per_sender(self, ident: str, port: int, sender: str,
                        limits: MailLimits | OutboundLimits) -> list[str]:
        """postfwd's rules that count the mail arriving on the loopback ``port`` per envelope
        sender matching ``sender`` (a postfwd comparison), held past ``limits``; ``ident``:
        the rule id, with ``{rid}`` for the window."""
        return [f"id={ident.format(rid=rid)}; protocol_state==END-OF-MESSAGE; "
                f"server_port=={port}; sender{sender}; action=rate(sender/{count}/{seconds}/"
                f"HOLD {LIMIT_TEXT}: $$sender may send {what}, held for the admin)"
                for rid, count, seconds, what in self.limit_windows(limits)]

    # ------------------------------------------------------------------ mailing lists

    def lists(self, env: Env) -> list[ListAddresses]:
        """The mailing lists routed to a list manager (``ListAddresses``), by address."""
        return sorted(env.incoming(ListAddresses), key=lambda r: r.list_address)

    def list_problems(self, env: Env) -> list[Problem]:
        """A list's addresses must be no mailbox, alias or other list's address (the list
        manager checks that they are in a mail domain)."""
        taken = {m.address: "a mailbox" for m in self.mailboxes}
        taken.update({a.address: "an alias" for a in self.aliases})
        out: list[Problem] = []
        for r in self.lists(env):
            loc = (*tuple(int(p) if p.isdigit() else p for p in r.origin.split(".") if p),
                   "address")
            for a in r.addresses:
                if a in taken:
                    out.append(Problem(loc, f"list {r.list_address} needs the address {a}, "
                                       f"which is already {taken[a]}"))
            taken.update({a: f"an address of list {r.list_address}" for a in r.addresses})
        return out

    def list_requests(self, env: Env) -> list[Request]:
        """The list manager's outgoing port: only its user (and root) may connect."""
        ports = sorted({(r.submit_port, r.user) for r in self.lists(env)})
        return [r for port, user in ports for r in (
            LoopbackGuard(port, (user, "root"), origin=f"{env.path}"),
            HealthCheck("tcp", f"127.0.0.1:{port}"))]

    def lists_main_cf(self, env: Env) -> list[str]:
        if not self.lists(env):
            return []
        return ["# Mailing lists: their addresses go to the list manager over LMTP.",
                f"transport_maps = texthash:{LIST_TRANSPORT}"]

    def lists_maps(self, env: Env) -> dict[str, str]:
        lists = self.lists(env)
        if not lists:
            return {}
        head = "# Managed by selfhost: the mailing lists' addresses -> the list manager.\n"
        return {LIST_TRANSPORT: head + "".join(
            f"{a} lmtp:[{r.lmtp.rsplit(':', 1)[0]}]:{r.lmtp.rsplit(':', 1)[1]}\n"
            for r in lists for a in r.addresses)}

    def lists_master_cf(self, env: Env) -> list[str]:
        """master.cf: the list manager's outgoing mail, on a loopback port of its own, asks
        postfwd (sender as the key: the list) and the first-time recipients service."""
        out: list[str] = []
        for port in sorted({r.submit_port for r in self.lists(env)}):
            out += [
                "# The list manager's outgoing mail: counted per sender (the list) by postfwd",
                "# and held over the limits, like the local programs' mail; DKIM-signed.",
                f"127.0.0.1:{port} inet n -     y       -       4       smtpd",
                "  -o syslog_name=postfix/lists",
                "  -o content_filter=",
                *LOOPBACK_SMTPD,
                "  -o milter_macro_daemon_name=ORIGINATING",
                self.first_time_restrictions(),
                f"  -o {{ smtpd_end_of_data_restrictions = check_policy_service {POSTFWD} }}",
            ]
        return out

    def lists_postfwd(self, env: Env) -> list[str]:
        """postfwd's rules for the list manager's port: per sender (a list), held."""
        lim = self.outbound_limits
        lines: list[str] = []
        for port in sorted({r.submit_port for r in self.lists(env)}):
            lines.append(f"# Mailing lists' mail (port {port}): per sender (a list), held over "
                         "a limit.")
            lines += self.held_per_sender(f"SELFHOST_LIST_{{rid}}_{port}", port, "=~/./", lim)
        return lines

    # ------------------------------------------------------------------ first-time recipients

    def first_time_restrictions(self) -> str:
        """The RCPT-time check of the submission ports and of the local programs' smtpd."""
        return (f"  -o {{ smtpd_recipient_restrictions = check_policy_service "
                f"unix:private/{RECIPIENTS_SERVICE} }}")

    def first_time_domains(self, env: Env) -> list[str]:
        """Recipient domains that are not outbound: the mail domains and the host's name."""
        return sorted({d.name for d in self.domains} | {env.server.fqdn.lower()})

    def first_time_master_cf(self, env: Env) -> list[str]:
        """master.cf: the policy service, spawned per connection as its own user."""
        lim = self.outbound_limits
        return [
            "# First-time recipients per day (asked at RCPT time by the submission ports and",
            "# the local programs' smtpd): one process per connection, as its own user.",
            f"{RECIPIENTS_SERVICE} unix -     n       n       -       0       spawn",
            f"  user={RECIPIENTS_USER} argv={RECIPIENTS_SCRIPT} --db {RECIPIENTS_DB}",
            f"  --per-day {lim.first_time_per_day} --over {lim.over_limit}",
            *(f"  --domain {d}" for d in self.first_time_domains(env)),
            *(f"  --limit {key}={limits.first_time_per_day}"
              for key, _, limits, _ in self.own_limits(env)
              if limits.first_time_per_day is not None
              and limits.first_time_per_day != lim.first_time_per_day),
        ]

    def first_time_main_cf(self) -> list[str]:
        """main.cf: spawn's limit on the life of one policy process."""
        return [
            "# The first-time recipients service: Postfix's policy client reconnects after",
            "# 1000 s (smtpd_policy_service_max_ttl); spawn must not kill the script before.",
            f"{RECIPIENTS_SERVICE}_time_limit = 3600",
            "",
        ]

    def first_time_contribute(self, c: Contribution) -> None:
        """The script (checked by Python before it is installed) and its database directory."""
        c.packages.append("python3")
        c.directories.append(ManagedDir(RECIPIENTS_DIR, "0700", owner=RECIPIENTS_USER,
                                        group=RECIPIENTS_USER))
        c.files.append(ManagedFile(RECIPIENTS_SCRIPT, RECIPIENTS_SCRIPT_TEXT, mode="0755",
                                   validate=VALIDATE_PYTHON))

    def master_cf(self, env: Env, release: str) -> str:
        relay_log = ("${multi_instance_name?{$multi_instance_name}:{postfix}}/$service_name"
                     if release != "bookworm" else "postfix/$service_name")
        submission = [
            "  -o smtpd_tls_security_level=encrypt",
            "  -o smtpd_sasl_auth_enable=yes",
            "  -o smtpd_sasl_type=dovecot",
            "  -o smtpd_sasl_path=private/auth",
            "  -o smtpd_tls_auth_only=yes",
            "  -o smtpd_client_restrictions=permit_sasl_authenticated,reject",
            "  -o smtpd_sender_restrictions=reject_non_fqdn_sender,reject_sender_login_mismatch",
            "  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject",
            self.first_time_restrictions(),
            "  -o milter_macro_daemon_name=ORIGINATING",
            f"  -o {{ smtpd_end_of_data_restrictions = check_policy_service {POSTFWD} }}",
            "  -o cleanup_service_name=subcleanup",
        ]
        return "\n".join([
            "# Managed by selfhost: Debian's services, submission on 587 (STARTTLS) and 465",
            "# (TLS), and a cleanup service that strips the submitting client's details.",
            "# service type  private unpriv  chroot  wakeup  maxproc command + args",
            "smtp      inet  n       -       y       -       -       smtpd",
            *self.spam_master_options(),
            "submission inet n       -       y       -       -       smtpd",
            "  -o syslog_name=postfix/submission",
            *submission,
            "submissions inet n      -       y       -       -       smtpd",
            "  -o syslog_name=postfix/submissions",
            "  -o smtpd_tls_wrappermode=yes",
            *submission,
            *self.local_limits_master_cf(),
            *self.lists_master_cf(env),
            *self.first_time_master_cf(env),
            "cleanup   unix  n       -       y       -       0       cleanup",
            "subcleanup unix n       -       y       -       0       cleanup",
            f"  -o header_checks=regexp:{SUBMISSION_HEADERS}",
            "qmgr      unix  n       -       n       300     1       qmgr",
            "tlsmgr    unix  -       -       y       1000?   1       tlsmgr",
            "rewrite   unix  -       -       y       -       -       trivial-rewrite",
            "bounce    unix  -       -       y       -       0       bounce",
            "defer     unix  -       -       y       -       0       bounce",
            "trace     unix  -       -       y       -       0       bounce",
            "verify    unix  -       -       y       -       1       verify",
            "flush     unix  n       -       y       1000?   0       flush",
            "proxymap  unix  -       -       n       -       -       proxymap",
            "proxywrite unix -       -       n       -       1       proxymap",
            "smtp      unix  -       -       y       -       -       smtp",
            "relay     unix  -       -       y       -       -       smtp",
            f"        -o syslog_name={relay_log}",
            "showq     unix  n       -       y       -       -       showq",
            "error     unix  -       -       y       -       -       error",
            "retry     unix  -       -       y       -       -       error",
            "discard   unix  -       -       y       -       -       discard",
            "local     unix  -       n       n       -       -       local",
            "virtual   unix  -       n       n       -       -       virtual",
            "lmtp      unix  -       -       y       -       -       lmtp",
            "anvil     unix  -       -       y       -       1       anvil",
            "scache    unix  -       -       y       -       1       scache",
            "postlog   unix-dgram n  -       n       -       1       postlogd",
            "",
        ])

    def maps(self, env: Env) -> dict[str, str]:
        """The texthash tables: mailboxes, aliases (with catch-alls), sender owners."""
        head = "# Managed by selfhost: changes here are overwritten on the next deploy.\n"
        boxes = [m.address for m in self.mailboxes]
        # Send-only accounts have no Maildir: not in the table (a catch-all maps them to
        # themselves below, like the mailboxes, so their mail never reaches the catch-all).
        mailboxes = "".join(f"{b} {b.split('@')[1]}/{b.split('@')[0]}/\n"
                            for b in sorted(boxes) if b not in self.send_only())
        alias_lines: list[str] = []
        alerts = env.server.alert_addresses
        if alerts:  # the system's own mail (cron, updates, alerts) goes to every admin
            for local in ("root", "postmaster"):
                alias_lines.append(f"{local}@{env.server.fqdn} {', '.join(alerts)}")
        for a in sorted(self.aliases, key=lambda a: a.address):
            alias_lines.append(f"{a.address} {', '.join(a.to)}")
        for d in sorted(self.domains, key=lambda d: d.name):
            if d.catch_all is None:
                continue
            # A catch-all would also take the mailboxes' mail: they map to themselves first.
            alias_lines += [f"{b} {b}" for b in sorted(boxes) if b.endswith("@" + d.name)]
            alias_lines.append(f"@{d.name} {d.catch_all}")
        owners: dict[str, list[str]] = {b: [b] for b in boxes}
        for a in self.aliases:
            mine = [t for t in a.to if t in boxes]
            if mine:
                owners.setdefault(a.address, [])
                owners[a.address] += [t for t in mine if t not in owners[a.address]]
        senders = "".join(f"{addr} {','.join(owners[addr])}\n" for addr in sorted(owners))
        extra = {BACKUP_MX_CLIENTS: head + "".join(f"{n} OK\n"
                                                    for n in self.backup_clients(env))
                 } if self.backup_clients(env) else {}
        return {
            **extra,
            **self.lists_maps(env),
            **self.send_only_maps(),
            **self.local_limits_maps(env),
            MAILBOXES: head + mailboxes,
            ALIASES: head + "".join(line + "\n" for line in alias_lines),
            SENDERS: head + senders,
            LOCAL_SENDERS: head + "".join(
                f"{d.name} REJECT 5.7.1 mail from {d.name} is sent after logging in, on the "
                "submission port\n" for d in sorted(self.domains, key=lambda d: d.name)),
            SUBMISSION_HEADERS: head + "# Submitted mail: the client's address, name and "
            "program stay private.\n"
            "/^Received:/ IGNORE\n/^X-Originating-IP:/ IGNORE\n/^X-Mailer:/ IGNORE\n"
            "/^User-Agent:/ IGNORE\n",
        }

    def postfwd_cf(self, env: Env | None = None) -> str:
        """postfwd's rules: one rate counter per login and window, counted once per message
        (Postfix asks at the end of each submitted message); the accounts other modules asked
        with limits of their own first, the general rules for every other login."""
        lim = self.outbound_limits
        own = self.own_limits(env) if env is not None else []
        lines = ["# Managed by selfhost: outbound limits per logged-in user (the submission",
                 "# ports ask at the end of each message; over a limit, the message is",
                 f"# {'deferred with a 4xx reply' if lim.over_limit == 'defer' else 'held'})."]
        over = ("450 4.7.1 {text}, try again later" if lim.over_limit == "defer"
                else "HOLD {text}, held for the admin")
        sasl = [key for key, local, _, _ in own if not local]
        for n, (key, local, limits, owner) in enumerate(own):
            if local:
                continue
            for rid, count, seconds, what in self.limit_windows(limits):
                text = over.format(text=f"{LIMIT_TEXT}: $$sasl_username ({owner}) may send "
                                   f"{what}")
                lines.append(f"id=SELFHOST_ACCOUNT_{n}_{rid}; protocol_state==END-OF-MESSAGE; "
                             f"sasl_username=={key}; "
                             f"action=rate(sasl_username/{count}/{seconds}/{text})")
        for rid, count, seconds, what in self.limit_windows(lim):
            text = over.format(text=f"{LIMIT_TEXT}: $$sasl_username may send {what}")
            lines.append(f"id=SELFHOST_{rid}; protocol_state==END-OF-MESSAGE; "
                         f"sasl_username=~{_others(sasl)}; "
                         f"action=rate(sasl_username/{count}/{seconds}/{text})")
        lists = self.lists_postfwd(env) if env is not None else []
        return "\n".join(lines + self.local_limits_postfwd(own) + lists) + "\n"

    # ------------------------------------------------------------------ Dovecot

    def users_file(self, env: Env) -> tuple[str, tuple[SecretPiece, ...]]:
        """The passwd-file: one line per mailbox, with a marker for its password hash."""
        release = env.require_target().release
        lines = ["# Managed by selfhost: the mailboxes (bcrypt hashes of their passwords)."]
        secrets: list[SecretPiece] = []
        for m in sorted(self.mailboxes, key=lambda m: m.address):
            if m.send_only:
                continue
            quota = (f"userdb_quota_rule=*:storage={m.quota_mb}M" if release == "bookworm"
                     else f"userdb_quota_storage_size={m.quota_mb}M")
            lines.append(f"{m.address}:{{BLF-CRYPT}}{SECRET_MARK.format(len(secrets))}"
                         f"::::::{quota}")
            secrets.append(SecretPiece(m.password, "bcrypt",
                                       context=f"{env.server.fqdn}/mail/{m.address}"))
        return "\n".join(lines) + "\n", tuple(secrets)

    def dovecot_conf(self, env: Env) -> str:
        release = env.require_target().release
        name = env.server.fqdn
        tls = f"{TLS_DIR}/{name}"
        postmaster = f"postmaster@{self.domains[0].name}"
        services = [
            "service imap-login {",
            "  inet_listener imap {",
            "    port = 0",
            "  }",
            "  inet_listener imaps {",
            "    port = 993",
            "    ssl = yes",
            "  }",
            "}",
            "service lmtp {",
            "  unix_listener /var/spool/postfix/private/dovecot-lmtp {",
            "    mode = 0600",
            "    user = postfix",
            "    group = postfix",
            "  }",
            "}",
            "service auth {",
            "  unix_listener /var/spool/postfix/private/auth {",
            "    mode = 0660",
            "    user = postfix",
            "    group = postfix",
            "  }",
            "}",
            *self.optional_dovecot_services(),
        ]
        mailboxes = [
            "namespace inbox {",
            "  inbox = yes",
            "  separator = /",
        ]
        for box, use in (("Drafts", "Drafts"), ("Sent", "Sent"), ("Junk", "Junk"),
                         ("Trash", "Trash")):
            mailboxes += [f"  mailbox {box} {{", f"    special_use = \\{use}",
                          "    auto = subscribe", "  }"]
        mailboxes.append("}")
        head = ["# Managed by selfhost: changes here are overwritten on the next deploy.",
                f"# Dovecot {'2.3 (Debian 12)' if release == 'bookworm' else '2.4 (Debian 13)'}"
                ": IMAP over TLS (993 only), LMTP from Postfix, Sieve, quota"
                + (", POP3 over TLS (995)" if self.pop3s else "")
                + (", ManageSieve (4190)" if self.managesieve else "") + "."]
        if release == "bookworm":
            body = [
                f"protocols = {self.dovecot_protocols()}",
                "listen = *, ::",
                "ssl = required",
                f"ssl_cert = <{tls}/fullchain.pem",
                f"ssl_key = <{tls}/privkey.pem",
                "ssl_min_protocol = TLSv1.2",
                "ssl_prefer_server_ciphers = yes",
                "disable_plaintext_auth = yes",
                "auth_mechanisms = plain login",
                "first_valid_uid = 100",
                "mail_uid = vmail",
                "mail_gid = vmail",
                f"mail_home = {VMAIL}/%d/%n",
                "mail_location = maildir:~/Maildir",
                "mail_plugins = $mail_plugins quota",
                *mailboxes,
                "passdb {",
                "  driver = passwd-file",
                f"  args = scheme=BLF-CRYPT {USERS}",
                "}",
                *self.send_only_passdb(release),
                "userdb {",
                "  driver = passwd-file",
                f"  args = {USERS}",
                "}",
                "plugin {",
                "  quota = count:User quota",
                "  quota_vsizes = yes",
                "  quota_grace = 0",
                "  quota_rule = *:storage=2G",
                "  quota_exceeded_message = Quota exceeded: the mailbox of this recipient is "
                "full.",
                "  sieve = file:~/sieve;active=~/.dovecot.sieve",
                *([f"  sieve_before = {SPAM_SIEVE}"] if self.spam_filter.enabled else []),
                "}",
                "lmtp_rcpt_check_quota = yes",
                *services,
                "protocol lmtp {",
                f"  postmaster_address = {postmaster}",
                "  mail_plugins = $mail_plugins sieve",
                "}",
                "protocol imap {",
                "  mail_plugins = $mail_plugins imap_quota",
                "}",
            ]
        else:
            body = [
                "dovecot_config_version = 2.4.0",
                "dovecot_storage_version = 2.4.0",
                f"protocols = {self.dovecot_protocols()}",
                "listen = *, ::",
                "ssl = required",
                f"ssl_server_cert_file = {tls}/fullchain.pem",
                f"ssl_server_key_file = {tls}/privkey.pem",
                "ssl_min_protocol = TLSv1.2",
                "auth_allow_cleartext = no",
                "auth_mechanisms = plain login",
                "first_valid_uid = 100",
                "mail_uid = vmail",
                "mail_gid = vmail",
                "mail_driver = maildir",
                f"mail_home = {VMAIL}/%{{user | domain}}/%{{user | username}}",
                "mail_path = ~/Maildir",
                "mail_plugins {",
                "  quota = yes",
                "}",
                *mailboxes,
                "passdb passwd-file {",
                f"  passwd_file_path = {USERS}",
                "  default_password_scheme = BLF-CRYPT",
                "}",
                *self.send_only_passdb(release),
                "userdb passwd-file {",
                f"  passwd_file_path = {USERS}",
                "}",
                "quota \"User quota\" {",
                "  driver = count",
                "}",
                "quota_storage_size = 2G",
                "quota_storage_grace = 0",
                "quota_exceeded_message = Quota exceeded: the mailbox of this recipient is full.",
                "lmtp_rcpt_check_quota = yes",
                *services,
                "protocol lmtp {",
                f"  postmaster_address = {postmaster}",
                "  mail_plugins {",
                "    sieve = yes",
                "  }",
                "}",
                "protocol imap {",
                "  mail_plugins {",
                "    imap_quota = yes",
                "  }",
                "}",
                "sieve_script personal {",
                "  driver = file",
                "  path = ~/sieve",
                "  active_path = ~/.dovecot.sieve",
                "}",
                *([
                    "sieve_script selfhost_spam {",
                    "  type = before",
                    "  driver = file",
                    f"  path = {SPAM_SIEVE}",
                    "}",
                ] if self.spam_filter.enabled else []),
            ]
        return "\n".join(head + body) + "\n"

    # ------------------------------------------------------------------ send-only, POP3S, ManageSieve

    def send_only_main_cf(self) -> list[str]:
        """main.cf lines: port 25 refuses the send-only addresses at RCPT (a 5xx during the
        dialogue, never a bounce later)."""
        if not self.send_only():
            return []
        return [f"smtpd_recipient_restrictions = check_recipient_access texthash:{SEND_ONLY}"]

    def send_only_maps(self) -> dict[str, str]:
        if not self.send_only():
            return {}
        head = "# Managed by selfhost: changes here are overwritten on the next deploy.\n"
        return {SEND_ONLY: head + "# Send-only accounts: they send, they receive nothing.\n"
                + "".join(f"{a} 550 5.1.1 <{a}>: this address only sends mail, it receives "
                          "none\n" for a in self.send_only())}

    def send_only_file(self, env: Env) -> tuple[str, tuple[SecretPiece, ...]]:
        """The send-only accounts' passwd-file (bcrypt hashes, no userdb fields: no home)."""
        lines = ["# Managed by selfhost: the send-only accounts (submission logins only)."]
        secrets: list[SecretPiece] = []
        for m in sorted(self.mailboxes, key=lambda m: m.address):
            if not m.send_only:
                continue
            lines.append(f"{m.address}:{{BLF-CRYPT}}{SECRET_MARK.format(len(secrets))}::::::")
            secrets.append(SecretPiece(m.password, "bcrypt",
                                       context=f"{env.server.fqdn}/mail/{m.address}"))
        return "\n".join(lines) + "\n", tuple(secrets)

    def send_only_passdb(self, release: str) -> list[str]:
        """Dovecot's passdb of the send-only accounts: the file's name ends with the login's
        service, so only Postfix's SASL logins (``smtp``) find it; no userdb lists them, so
        LMTP has nowhere to deliver their mail either."""
        if not self.send_only():
            return []
        path = SEND_ONLY_USERS.removesuffix(".smtp")
        if release == "bookworm":
            return ["passdb {", "  driver = passwd-file",
                    f"  args = scheme=BLF-CRYPT {path}.%s", "}"]
        return ["passdb send_only {", "  driver = passwd-file",
                f"  passwd_file_path = {path}.%{{protocol}}",
                "  default_password_scheme = BLF-CRYPT", "}"]

    def dovecot_protocols(self) -> str:
        return " ".join(["imap", "lmtp", *(["pop3"] if self.pop3s else []),
                         *(["sieve"] if self.managesieve else [])])

    def optional_dovecot_services(self) -> list[str]:
        """POP3 over TLS on 995 only (110 closed), ManageSieve on 4190 (STARTTLS, then
        login: ``ssl = required`` refuses a login before it)."""
        out: list[str] = []
        if self.pop3s:
            out += ["service pop3-login {", "  inet_listener pop3 {", "    port = 0", "  }",
                    "  inet_listener pop3s {", "    port = 995", "    ssl = yes", "  }", "}"]
        if self.managesieve:
            out += ["service managesieve-login {", "  inet_listener sieve {",
                    "    port = 4190", "  }", "}"]
        return out

    def optional_jail_ports(self) -> list[str]:
        return [*(["pop3s"] if self.pop3s else []), *(["4190"] if self.managesieve else [])]

    def optional_requests(self) -> list[Request]:
        out: list[Request] = []
        if self.pop3s:
            out += [Port(995, "tcp", "internet", comment="POP3 over TLS"),
                    HealthCheck("tcp", "127.0.0.1:995")]
        if self.managesieve:
            out += [Port(4190, "tcp", "internet", comment="ManageSieve (STARTTLS required)"),
                    HealthCheck("tcp", "127.0.0.1:4190")]
        return out

    def optional_contribute(self, c: Contribution, env: Env) -> None:
        """Packages and files of send-only accounts, POP3S and ManageSieve (into ``c``)."""
        c.packages += [*(["dovecot-pop3d"] if self.pop3s else []),
                       *(["dovecot-managesieved"] if self.managesieve else [])]
        if self.send_only():
            text, secrets = self.send_only_file(env)
            c.files.append(ManagedFile(SEND_ONLY_USERS, text, mode="0640", group="dovecot",
                                       secrets=secrets))

    # ------------------------------------------------------------------ OpenDKIM

    def opendkim_conf(self) -> str:
        return "\n".join([
            "# Managed by selfhost: DKIM signing of the mail domains' outgoing mail.",
            "Syslog yes",
            "UMask 007",
            "Mode s",
            f"Socket local:{DKIM_SOCKET}",
            "PidFile /run/opendkim/opendkim.pid",
            "# Group postfix: the socket (mode 0770 with this UMask) is Postfix's to use.",
            "UserID opendkim:postfix",
            "Canonicalization relaxed/simple",
            "OversignHeaders From",
            f"KeyTable file:{KEY_TABLE}",
            f"SigningTable refile:{SIGNING_TABLE}",
            "InternalHosts 127.0.0.1, ::1",
            "",
        ])

    def key_table(self) -> str:
        lines = ["# Managed by selfhost: selector._domainkey.domain domain:selector:key"]
        for d in sorted(self.domains, key=lambda d: d.name):
            for s in d.dkim_selectors:
                lines.append(f"{s}._domainkey.{d.name} {d.name}:{s}:{DKIM_KEYS}/{d.name}/"
                             f"{s}.private")
        return "\n".join(lines) + "\n"

    def signing_table(self) -> str:
        lines = ["# Managed by selfhost: the first selector of each domain signs."]
        for d in sorted(self.domains, key=lambda d: d.name):
            lines.append(f"*@{d.name} {d.dkim_selectors[0]}._domainkey.{d.name}")
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ spam filter

    def spam_master_options(self) -> list[str]:
        """master.cf options of the port-25 smtpd: the spam milter before OpenDKIM's (the
        submission ports keep main.cf's ``smtpd_milters``: OpenDKIM only)."""
        if not self.spam_filter.enabled:
            return []
        return ["  -o smtpd_milters=unix:spamass/spamass.sock,unix:opendkim/opendkim.sock"]

    def spam_cf(self) -> str:
        spam = self.spam_filter
        return "\n".join([
            "# Managed by selfhost: SpamAssassin's site settings for spamd (read after local.cf).",
            f"required_score {spam.junk_score:g}",
            "# Only headers are added (X-Spam-Flag, X-Spam-Status); the message stays as sent.",
            "report_safe 0",
            *(["# No network: only the rules shipped in the package (no DNS block lists,",
               "# no DKIM/SPF lookups).", "dns_available no"]
              if not spam.network_checks else []),
            "",
        ])

    def spamd_dropin(self) -> str:
        n = self.spam_filter.max_children
        return "\n".join([
            "# Managed by selfhost: spamd on a Unix socket for spamass-milter only, as",
            "# debian-spamd, no per-user settings, a bounded number of children.",
            "[Service]",
            "RuntimeDirectory=spamd",
            "ExecStart=",
            "ExecStart=/usr/sbin/spamd --pidfile=/run/spamd.pid --username=debian-spamd "
            "--groupname=debian-spamd --nouser-config --helper-home-dir=/var/lib/spamassassin "
            f"--max-children={n} --min-children=1 --min-spare=1 --max-spare=1 "
            f"--socketpath={SPAMD_SOCKET} --socketowner=debian-spamd "
            "--socketgroup=spamass-milter --socketmode=0660",
            "",
        ])

    def spamass_unit(self) -> str:
        return "\n".join([
            "# Managed by selfhost: replaces the package's LSB script (spamass-milter ships no",
            "# systemd unit). Group postfix and this umask: the socket is Postfix's to use.",
            "[Unit]",
            "Description=selfhost: SpamAssassin milter for Postfix (inbound mail on port 25)",
            "Wants=spamd.service",
            "After=spamd.service",
            "",
            "[Service]",
            "User=spamass-milter",
            "Group=postfix",
            "# spamd's socket is group spamass-milter's (the primary group is postfix here).",
            "SupplementaryGroups=spamass-milter",
            "UMask=0007",
            f"ExecStartPre=+/usr/bin/install -d -m 0750 -o spamass-milter -g postfix "
            f"{SPAMASS_SOCKET_DIR}",
            f"ExecStartPre=/bin/rm -f {SPAMASS_SOCKET_DIR}/spamass.sock",
            f"ExecStart=/usr/sbin/spamass-milter -p {SPAMASS_SOCKET_DIR}/spamass.sock -m "
            f"-r {self.spam_filter.reject_score} -i 127.0.0.1 -u spamass-milter -- "
            f"-U {SPAMD_SOCKET}",
            "Restart=on-failure",
            "",
            "[Install]",
            "WantedBy=multi-user.target",
            "",
        ])

    def spam_contribute(self, c: Contribution) -> None:
        """The spam filter's packages, files, commands and units (into ``c``)."""
        if not self.spam_filter.enabled:
            return
        # gpg-agent: spamassassin's postinst imports sa-update's signing key with gpg, which
        # fails the install without the agent (a Recommends of the package, not installed).
        c.packages += ["spamassassin", "spamd", "spamc", "gpg-agent"]
        c.files += [
            ManagedFile(SPAM_CF, self.spam_cf(), mode="0644", validate=VALIDATE_SPAM),
            ManagedFile(SPAMD_DROPIN, self.spamd_dropin(), mode="0644"),
            ManagedFile(SPAMASS_UNIT, self.spamass_unit(), mode="0644"),
            ManagedFile(SPAM_SIEVE, SPAM_SIEVE_SCRIPT, mode="0644", validate=VALIDATE_SIEVE),
        ]
        c.commands += [
            Command("mail: reload systemd units (spam filter)", "systemctl daemon-reload",
                    on_change=(SPAMD_DROPIN, SPAMASS_UNIT)),
            # Installed here, once Postfix (its user) and the unit above exist: the package's
            # LSB script chowns its socket to postfix and fails the install without it.
            Command("mail: spamass-milter (after Postfix, with its systemd unit)",
                    "DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
                    "--no-install-recommends spamass-milter >/dev/null",
                    unless="dpkg-query -W -f='${Status}' spamass-milter 2>/dev/null | "
                    "grep -q 'install ok installed'", after_files=True),
            Command("mail: compile the global spam Sieve script", f"sievec {SPAM_SIEVE}",
                    on_change=(SPAM_SIEVE,)),
        ]
        c.units += [
            Unit("spamd.service", reload_on=(SPAMD_DROPIN, SPAM_CF), reload=False),
            Unit("spamass-milter.service", reload_on=(SPAMASS_UNIT,), reload=False),
        ]

    # ------------------------------------------------------------------ contribution

    def contribute(self, env: Env) -> Contribution:
        return self.with_accounts(env).contribute_merged(env)

    def contribute_merged(self, env: Env) -> Contribution:
        target = env.require_target()
        name = env.server.fqdn
        c = Contribution(packages=["postfix", "postfwd", "dovecot-imapd", "dovecot-lmtpd", "dovecot-sieve",
                                   "opendkim", "opendkim-tools", "openssl", "ca-certificates"])
        # Until the web server has exported the certificate, a self-signed placeholder lets
        # Postfix and Dovecot start; the export replaces it and reloads them.
        c.commands.append(_placeholder_certificate(name, "mail"))
        for d in sorted(self.domains, key=lambda d: d.name):
            for s in d.dkim_selectors:
                key = f"{DKIM_KEYS}/{d.name}/{s}.private"
                c.commands.append(Command(
                    f"mail: DKIM key {s} of {d.name} (generated here, never printed)",
                    f"install -d -m 0750 -o opendkim -g opendkim {DKIM_KEYS} "
                    f"{DKIM_KEYS}/{d.name} && opendkim-genkey -b 2048 -d {d.name} -s {s} "
                    f"-D {DKIM_KEYS}/{d.name} && chown opendkim:opendkim {key} && "
                    f"chmod 0600 {key}",
                    unless=f"test -s {key}"))
        c.directories += [
            ManagedDir(VMAIL, "0750", owner="vmail", group="vmail"),
            ManagedDir(DKIM_DIR, "0755"),
            ManagedDir(DKIM_SOCKET_DIR, "0750", owner="opendkim", group="postfix"),
        ]
        validate_main = VALIDATE_MAIN
        validate_master = (
            "d=$(mktemp -d) && cp " + MAIN_CF + " \"$d/main.cf\" && cp {path} \"$d/master.cf\" "
            "&& out=$(postconf -c \"$d\" -M 2>&1 >/dev/null); rc=$?; rm -rf \"$d\"; "
            "[ $rc -eq 0 ] && [ -z \"$out\" ] || { echo \"$out\" >&2; exit 1; }")
        relay_files = self.relay_files()
        c.files += relay_files
        if relay_files:  # the SASL mechanisms (PLAIN, LOGIN) of Postfix's SMTP client
            c.packages.append("libsasl2-modules")
        sts_dirs, sts_files = self.mta_sts_files(env)
        c.directories += sts_dirs
        c.files += sts_files
        postfix_files = [MAIN_CF, MASTER_CF, *self.maps(env), *(f.path for f in relay_files)]
        for path, text in self.maps(env).items():
            c.files.append(ManagedFile(path, text, mode="0644"))
        c.files.append(ManagedFile(MASTER_CF, self.master_cf(env, target.release),
                                   validate=validate_master))
        c.files.append(ManagedFile(MAIN_CF, self.main_cf(env), validate=validate_main))
        users, secrets = self.users_file(env)
        c.files.append(ManagedFile(USERS, users, mode="0640", group="dovecot", secrets=secrets))
        c.files.append(ManagedFile(DOVECOT_CONF, self.dovecot_conf(env), mode="0644",
                                   validate="doveconf -n -c {path} >/dev/null"))
        c.files.append(ManagedFile(KEY_TABLE, self.key_table(), mode="0644"))
        c.files.append(ManagedFile(POSTFWD_CF, self.postfwd_cf(env), mode="0644",
                                   validate=VALIDATE_POSTFWD))
        c.files.append(ManagedFile(LIMITS_ALERT, LIMITS_SCRIPT, mode="0755"))
        c.files.append(ManagedFile(LIMITS_UNIT, LIMITS_SERVICE, mode="0644"))
        c.files.append(ManagedFile(LIMITS_TIMER, LIMITS_TIMER_UNIT, mode="0644"))
        c.commands.append(Command("mail: reload systemd units", "systemctl daemon-reload",
                                  on_change=(LIMITS_UNIT, LIMITS_TIMER)))
        c.files.append(ManagedFile(SIGNING_TABLE, self.signing_table(), mode="0644"))
        c.files.append(ManagedFile(OPENDKIM_CONF, self.opendkim_conf(), mode="0644",
                                   validate="opendkim -n -x {path}"))
        # Local mail (root, postmaster of the host) goes through Debian's /etc/aliases, whose
        # table Postfix's package builds only when it is configured at install.
        c.commands.append(Command("mail: the table of /etc/aliases", "newaliases",
                                  unless="test -s /etc/aliases.db", after_files=True))
        self.spam_contribute(c)
        self.optional_contribute(c, env)
        self.first_time_contribute(c)
        c.units += [
            Unit("opendkim.service", reload_on=(OPENDKIM_CONF, KEY_TABLE, SIGNING_TABLE),
                 reload=False),
            Unit("dovecot.service", reload_on=(DOVECOT_CONF, USERS, SEND_ONLY_USERS)),
            Unit("postfwd.service", reload_on=(POSTFWD_CF,)),
            Unit("selfhost-mail-limits.timer", reload_on=(LIMITS_TIMER, LIMITS_UNIT),
                 reload=False),
            Unit("postfix.service", reload_on=tuple(postfix_files)),
        ]
        return c


LIMITS_SCRIPT = (Path(__file__).parent / "mail-limits.sh").read_text(encoding="utf-8")

RECIPIENTS_SCRIPT_TEXT = (Path(__file__).parent / "mail_recipients.py").read_text(
    encoding="utf-8")

VALIDATE_PYTHON = (
    "d=$(mktemp -d) && PYTHONPYCACHEPREFIX=\"$d\" python3 -m py_compile {path}; rc=$?; "
    "rm -rf \"$d\"; exit $rc")
"""Python compiles the staged script (a syntax error fails), its cache in a directory of its
own, removed."""

LIMITS_SERVICE = f"""# Managed by selfhost: changes here are overwritten on the next deploy.
[Unit]
Description=selfhost: alert the admin when a mail user reached an outbound limit

[Service]
Type=oneshot
ExecStart={LIMITS_ALERT}
"""

LIMITS_TIMER_UNIT = """# Managed by selfhost: changes here are overwritten on the next deploy.
[Unit]
Description=selfhost: look for outbound mail limits reached, every minute

[Timer]
OnBootSec=60
OnUnitActiveSec=60
AccuracySec=5

[Install]
WantedBy=timers.target
"""

VALIDATE_POSTFWD = (
    "out=$(postfwd -f {path} -C 2>&1); printf '%s\\n' \"$out\" | grep -q '^Rule ' && "
    "! printf '%s\\n' \"$out\" | grep -q 'LOG warning' || { echo \"$out\" >&2; exit 1; }")
"""postfwd -C exits 1 even for a good file: it must list the rules and warn about nothing
(an invalid line is skipped with a warning)."""

DOVECOT_24_FAILED = (r"^Login aborted: [^(]*\(auth failed, \d+ attempts(?: in \d+ secs)?\) "
                     r"\(auth_failed\):(?: user=<<F-USER>[^>]*</F-USER>>,)?(?: method=\S+,)? "
                     r"rip=<HOST>(?:,|\s*$)")
DOVECOT_FILTER = f"""# Managed by selfhost: Debian's dovecot filter, plus Dovecot 2.4's (Debian 13)
# failed-login line, which fail2ban 1.1's filter does not match: "imap-login: Login aborted:
# Connection closed (auth failed, 1 attempts in 2 secs) (auth_failed): user=<...>,
# method=PLAIN, rip=ADDRESS, ...".
[INCLUDES]
before = dovecot.conf

[Definition]
failregex = %(known/failregex)s
            {DOVECOT_24_FAILED}
"""

SPAM_SIEVE_SCRIPT = """# Managed by selfhost: runs before the user's own Sieve script.
# What SpamAssassin flagged goes to the Junk folder, and nothing else runs on it.
require ["fileinto", "mailbox"];
if header :is "X-Spam-Flag" "YES" {
  fileinto :create "Junk";
  stop;
}
"""

VALIDATE_SPAM = (
    "d=$(mktemp -d) && cp -a /etc/spamassassin/. \"$d\" && cp {path} \"$d/selfhost.cf\" && "
    "spamassassin --lint --siteconfigpath=\"$d\"; rc=$?; rm -rf \"$d\"; exit $rc")
"""SpamAssassin's own check of its site configuration with the staged file in place (it
exits 1 on a line it cannot parse)."""

VALIDATE_SIEVE = (
    "d=$(mktemp -d) && sievec {path} \"$d/out.svbin\"; rc=$?; rm -rf \"$d\"; exit $rc")

VALIDATE_MAIN = (
    "d=$(mktemp -d) && cp {path} \"$d/main.cf\" && cp " + MASTER_CF + " \"$d/\" && "
    "out=$(postconf -c \"$d\" -n 2>&1 >/dev/null); rc=$?; rm -rf \"$d\"; "
    "[ $rc -eq 0 ] && [ -z \"$out\" ] || { echo \"$out\" >&2; exit 1; }")
"""Checks a main.cf with the live master.cf: postconf prints nothing on stderr (an unknown
parameter, a bad value) and exits 0."""


def _tls_settings(tls: str) -> list[str]:
    """Postfix's TLS settings with the certificate in directory ``tls``."""
    return [
        "# TLS: the certificate of the server's name; TLS 1.2 or later.",
        f"smtpd_tls_chain_files = {tls}/privkey.pem, {tls}/fullchain.pem",
        "smtpd_tls_security_level = may",
        "smtpd_tls_auth_only = yes",
        "smtpd_tls_protocols = >=TLSv1.2",
        "smtpd_tls_mandatory_protocols = >=TLSv1.2",
        "smtpd_tls_mandatory_ciphers = high",
        "smtpd_tls_session_cache_database = btree:${data_directory}/smtpd_scache",
        "smtp_tls_security_level = may",
        "smtp_tls_protocols = >=TLSv1.2",
        "smtp_tls_CAfile = /etc/ssl/certs/ca-certificates.crt",
        "smtp_tls_session_cache_database = btree:${data_directory}/smtp_scache",
    ]


def _placeholder_certificate(name: str, who: str) -> Command:
    """A self-signed certificate for ``name`` until the web server exports the real one."""
    tls = f"{TLS_DIR}/{name}"
    return Command(
        f"{who}: placeholder certificate for {name} until the real one is exported",
        f"install -d -m 0755 {TLS_DIR} && install -d -m 0750 {tls} && "
        f"openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN={name} "
        f"-addext subjectAltName=DNS:{name} -keyout {tls}/privkey.pem.new "
        f"-out {tls}/fullchain.pem.new 2>/dev/null && chmod 0640 {tls}/privkey.pem.new && "
        f"mv {tls}/privkey.pem.new {tls}/privkey.pem && "
        f"mv {tls}/fullchain.pem.new {tls}/fullchain.pem",
        unless=f"test -s {tls}/fullchain.pem && test -s {tls}/privkey.pem")


class BackupMxServer(Module):
    """Provider of :class:`BackupMx` requests: this host's Postfix as the backup MX of other
    hosts' mail domains (nothing when no host asks).

    It accepts mail for the domains (``relay_domains``) only for the recipients the primary's
    model lists (``relay_recipient_maps``: an unknown address is refused during the SMTP
    dialogue, so the backup never accepts mail it would have to bounce later, the
    backscatter that gets servers blacklisted), refuses relaying anywhere else, keeps the
    mail up to the asked number of days (``maximal_queue_lifetime``) and hands it to the
    primary's name on port 25 (``transport_maps``), over TLS only (``encrypt``: the
    primary always offers STARTTLS; its certificate is not verified, as it may come from a
    private CA). No mailbox is stored here. Retries back off to 15 minutes at most, so mail
    arrives soon after the primary is back (``postqueue -f`` sends it at once).
    The name of the primary is looked up in DNS, then in ``/etc/hosts``. The host's own mail
    (root, postmaster) goes to the admin's address when the host has ``notify``.
    """

    provides: ClassVar[tuple[type[Request], ...]] = (BackupMx,)
    uses: ClassVar[tuple[type[Request], ...]] = (Certificate, Port, HealthCheck, Sendmail)

    def requests(self, env: Env) -> list[Request]:
        if not env.incoming(BackupMx):
            return []
        return [Certificate((env.server.fqdn,), reload=("postfix.service",)),
                Port(25, "tcp", "internet", comment="SMTP (backup MX of other hosts' mail)"),
                HealthCheck("unit", "postfix.service"),
                HealthCheck("tcp", "127.0.0.1:25"),
                Sendmail("postfix")]

    def assertions(self, env: Env) -> list[Problem]:
        out: list[Problem] = []
        owner: dict[str, str] = {}
        for r in env.incoming(BackupMx):
            for d in r.domains:
                if d in owner and owner[d] != r.primary:
                    out.append(Problem(
                        ("hostname",), f"{env.host} is asked to be the backup MX of {d} by both "
                        f"{owner[d]} and {r.primary}"))
                owner.setdefault(d, r.primary)
        return out

    def main_cf(self, env: Env, reqs: list[BackupMx]) -> str:
        name = env.server.fqdn
        domains = sorted({d for r in reqs for d in r.domains})
        days = max(r.queue_days for r in reqs)
        return "\n".join([
            "# Managed by selfhost: changes here are overwritten on the next deploy.",
            "# This host is a backup MX: it keeps other hosts' mail while they are down.",
            *postfix_basics(name, max(r.max_message_mb for r in reqs),
                            aliases=f"texthash:{RELAY_ALIASES}"),
            "",
            "# Backup MX: mail for these domains, only for their primary's recipients (others",
            "# are refused in the SMTP dialogue: no backscatter), kept for days, handed over",
            "# to the primary over TLS.",
            "relay_domains = " + ", ".join(domains),
            f"relay_recipient_maps = texthash:{RELAY_RECIPIENTS}",
            f"transport_maps = texthash:{RELAY_TRANSPORT}",
            f"smtp_tls_policy_maps = texthash:{RELAY_TLS}",
            "smtp_host_lookup = dns, native",
            f"maximal_queue_lifetime = {days}d",
            f"bounce_queue_lifetime = {days}d",
            "maximal_backoff_time = 15m",
            "",
            *_tls_settings(f"{TLS_DIR}/{name}"),
            "",
            "# Port 25: no login; no relaying but to the domains above; their senders come",
            "# through their own server's submission, never from outside.",
            "smtpd_sasl_auth_enable = no",
            "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination",
            "smtpd_sender_restrictions = reject_non_fqdn_sender, permit_mynetworks, "
            f"check_sender_access texthash:{RELAY_SENDERS}",
            "",
        ])

    def maps(self, env: Env, reqs: list[BackupMx]) -> dict[str, str]:
        head = "# Managed by selfhost: changes here are overwritten on the next deploy.\n"
        recipients = sorted({a for r in reqs for a in r.recipients})
        transport = sorted({(d, r.primary) for r in reqs for d in r.domains})
        primaries = sorted({r.primary for r in reqs})
        senders = sorted({d for r in reqs for d in r.reject_senders})
        alerts = env.server.alert_addresses
        aliases = ([f"{local}@{env.server.fqdn} {', '.join(alerts)}\n"
                    for local in ("root", "postmaster")] if alerts else [])
        return {
            RELAY_RECIPIENTS: head + "".join(f"{a} OK\n" for a in recipients),
            RELAY_TRANSPORT: head + "".join(f"{d} smtp:[{p}]:25\n" for d, p in transport),
            RELAY_TLS: head + "".join(f"[{p}]:25 encrypt\n" for p in primaries),
            RELAY_SENDERS: head + "".join(
                f"{d} REJECT 5.7.1 mail from {d} is sent through its own server, not from "
                "outside\n" for d in senders),
            RELAY_ALIASES: head + "".join(aliases),
        }

    def contribute(self, env: Env) -> Contribution:
        reqs = sorted(env.incoming(BackupMx), key=lambda r: r.primary)
        c = Contribution()
        if not reqs:
            return c
        c.packages += ["postfix", "openssl", "ca-certificates"]
        c.commands.append(_placeholder_certificate(env.server.fqdn, "backup MX"))
        maps = self.maps(env, reqs)
        for path, text in maps.items():
            c.files.append(ManagedFile(path, text, mode="0644"))
        c.files.append(ManagedFile(MAIN_CF, self.main_cf(env, reqs), validate=VALIDATE_MAIN))
        c.commands.append(Command("backup MX: the table of /etc/aliases", "newaliases",
                                  unless="test -s /etc/aliases.db", after_files=True))
        c.units.append(Unit("postfix.service", reload_on=(MAIN_CF, *maps)))
        return c
