"""Mail to the admin: how the server reports (update reports, failed or late backups).

A home server rarely runs its own outgoing mail server; it relays through the admin's mail
provider. ``notify`` installs msmtp as the system's ``sendmail`` (msmtp-mta), so every tool
that reports by mail (unattended-upgrades, the backup alerts, cron) reaches the admin.
Without ``notify`` those reports go to the journal only. When a mail server runs on the host
(it holds the ``sendmail`` role), msmtp steps back: the mail server delivers the reports.

The relay password is a secret reference, deployed to a root-only file that msmtp reads
with ``passwordeval``; it never appears in msmtp's configuration or on a command line.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from selfhost.compose.module import Contribution, Env, Module
from selfhost.compose.requests import Request, Sendmail
from selfhost.compose.resources import ManagedDir, ManagedFile
from selfhost.models.base import SecretRef, StrictModel

if TYPE_CHECKING:
    from selfhost.models.server import Server

MSMTPRC = "/etc/msmtprc"
ALIASES = "/etc/selfhost/mail-aliases"
PASSWORD_FILE = "/etc/selfhost/smtp-password"
LOOPBACK_NAMES = {"localhost", "localhost.localdomain"}


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SmtpRelay(StrictModel):
    """The SMTP server (submission) that relays the server's mail, e.g. the admin's provider."""

    host: str = Field(description="Host name of the SMTP relay, e.g. 'smtp.example.org'.")
    port: int = Field(default=587, ge=1, le=65535,
                      description="Port: 587 (submission, STARTTLS) or 465 (TLS from the start).")
    tls: Literal["starttls", "tls", "off"] = Field(
        default="starttls",
        description="'starttls' (port 587), 'tls' (port 465), or 'off': allowed only for a "
        "relay on the server itself (127.0.0.1 / ::1 / localhost), never over the network.",
    )
    user: str | None = Field(default=None,
                             description="Login at the relay (usually the sender's address).")
    password: SecretRef | None = Field(
        default=None, description="The relay login's password, as a reference {env:} / {file:}."
    )

    @model_validator(mode="after")
    def _safe(self) -> SmtpRelay:
        if self.tls == "off" and not _is_loopback(self.host):
            raise ValueError(f"tls: off would send the relay password and mail in clear text to "
                             f"{self.host}; use starttls or tls (off is only for a relay on "
                             "this server: 127.0.0.1, ::1, localhost)")
        if (self.user is None) != (self.password is None):
            raise ValueError("give both `user` and `password` (or neither, for a relay that "
                             "does not authenticate)")
        return self


class Notify(StrictModel, Module):
    """Where the server's reports go (update reports, failed/late backups, cron output)."""

    email: str = Field(
        pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$",
        description="The admin's address: every mail to root or a local user goes there.",
    )
    sender: str | None = Field(
        default=None, pattern=r"^[^@\s]+@[^@\s]+$",
        description="From address (default: the relay user if it is an address, else "
        "root@HOSTNAME.DOMAIN).",
    )
    smtp: SmtpRelay = Field(description="The SMTP relay the mail goes through.")

    uses: ClassVar[tuple[type[Request], ...]] = (Sendmail,)

    def requests(self, env: Env) -> list[Request]:
        return [Sendmail("msmtp-mta", fallback=True)]

    def contribute(self, env: Env) -> Contribution:
        if any(s.package != "msmtp-mta" for s in env.incoming(Sendmail)):
            # A mail server on this host is the system's sendmail: it delivers the reports
            # to the admin itself (its aliases send root's mail to `email`).
            return Contribution()
        return contribute(env.server)



def contribute(server: Server) -> Contribution:
    """msmtp as sendmail, its configuration, aliases and the relay password file."""
    n = server.notify
    c = Contribution()
    if n is None:
        return c
    c.packages += ["msmtp", "msmtp-mta", "ca-certificates"]
    c.directories.append(ManagedDir("/etc/selfhost", "0755"))
    relay = n.smtp
    sender = n.sender or (relay.user if relay.user and "@" in relay.user
                          else f"root@{server.fqdn}")
    lines = [
        "# Managed by selfhost: outgoing mail through the admin's relay (msmtp as sendmail).",
        "defaults",
        "syslog LOG_MAIL",
        f"aliases {ALIASES}",
        "",
        "account selfhost",
        f"host {relay.host}",
        f"port {relay.port}",
        f"from {sender}",
        "set_from_header auto",
    ]
    if relay.tls == "off":
        lines += ["tls off"]
    else:
        lines += ["tls on", "tls_trust_file /etc/ssl/certs/ca-certificates.crt",
                  f"tls_starttls {'on' if relay.tls == 'starttls' else 'off'}"]
    if relay.user is not None and relay.password is not None:
        lines += ["auth on", f"user {relay.user}", f'passwordeval "cat {PASSWORD_FILE}"']
        c.files.append(ManagedFile(PASSWORD_FILE, "", mode="0600", secret=relay.password))
    else:
        lines += ["auth off"]
    lines += ["", "account default : selfhost", ""]
    c.files.append(ManagedFile(MSMTPRC, "\n".join(lines), mode="0644"))
    c.files.append(ManagedFile(ALIASES, "# Managed by selfhost: local recipients -> the admin.\n"
                               f"default: {', '.join(server.alert_addresses)}\n", mode="0644"))
    return c
