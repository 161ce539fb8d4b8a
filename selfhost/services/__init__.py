"""The service catalog: one module per service, each holding its model and its requests.

To add a service: write ``selfhost/services/<name>.py`` with a :class:`~.base.Service`
subclass (its requests, assertions and contribution), then add one field for it to
:class:`Services` below. A service module never imports another one.
"""

from __future__ import annotations

from pydantic import Field

from selfhost.models.base import StrictModel
from selfhost.services.association import AssociationService
from selfhost.services.base import Service
from selfhost.services.knot import AuthoritativeDnsService
from selfhost.services.mail import MailService
from selfhost.services.mailman import MailmanService
from selfhost.services.monitoring import MonitoringService
from selfhost.services.prosody import XmppService
from selfhost.services.radicale import RadicaleService
from selfhost.services.samba import SambaService
from selfhost.services.syncthing import SyncthingService
from selfhost.services.unbound import UnboundService
from selfhost.services.web import WebService
from selfhost.services.wireguard import WireGuardService

__all__ = ["AssociationService", "AuthoritativeDnsService", "MailService",
           "MailmanService", "MonitoringService", "RadicaleService", "SambaService", "Service", "Services",
           "SyncthingService", "UnboundService", "WebService", "WireGuardService", "XmppService"]


class Services(StrictModel):
    """The services this server runs. A service that is absent (or ``enabled: false``) is not
    installed, and its ports stay closed."""

    web: WebService | None = Field(
        default=None,
        description="Caddy: static web sites, and the HTTPS front of the other services "
        "(present whenever a service asks for a virtual host).",
    )
    radicale: RadicaleService | None = Field(
        default=None, description="Calendars and contacts (CalDAV/CardDAV) with Radicale."
    )
    wireguard: WireGuardService | None = Field(
        default=None, description="A WireGuard VPN to reach home from your devices."
    )
    dns: AuthoritativeDnsService | None = Field(
        default=None, description="Authoritative DNS: the model's zones served by Knot with "
        "DNSSEC, and secondaries on other hosts of the fleet."
    )
    monitoring: MonitoringService | None = Field(
        default=None, description="Monit: disks, memory, failed units, every service's health "
        "checks and outbound traffic, watched every minute; the admin is mailed on each change."
    )
    resolver: UnboundService | None = Field(
        default=None,
        description="Unbound: a DNSSEC-validating DNS resolver for the LAN and the VPN, with "
        "the server's names answered with its home address, and optional blocklists.",
    )
    xmpp: XmppService | None = Field(
        default=None, description="Instant messaging (XMPP) with Prosody: accounts, group "
        "chats, file sharing."
    )
    samba: SambaService | None = Field(
        default=None, description="NAS: file shares for the home network (SMB3) with Samba."
    )

    sync: SyncthingService | None = Field(
        default=None, description="File sync with Syncthing for named users of the host: "
        "their devices and folders; discovery and relays off unless turned on."
    )

    mail: MailService | None = Field(
        default=None, description="A mail server: SMTP (Postfix) and IMAP (Dovecot) for your "
        "domains, with DKIM signing; it also becomes the system's sendmail."
    )

    lists: MailmanService | None = Field(
        default=None, description="Mailing lists with Mailman 3 (subscription and posting by "
        "mail, private archives), through the mail service (present whenever a module asks "
        "for a list, e.g. the association's members)."
    )

    association: AssociationService | None = Field(
        default=None, description="Hosting for an association's members: one Unix user, "
        "PHP-FPM pool and MariaDB user per member, their sites behind Caddy, from named plans."
    )

    def enabled(self) -> list[Service]:
        """The services switched on, in a stable order."""
        out: list[Service] = []
        for name in type(self).model_fields:
            svc = getattr(self, name)
            if isinstance(svc, Service) and svc.enabled:
                out.append(svc)
        return out
