"""The service catalog: one module per service, each holding its model and contributions.

To add a service: write ``selfhost/services/<name>.py`` with a :class:`~.base.Service`
subclass, then add one field for it to :class:`Services` below.
"""

from __future__ import annotations

from pydantic import Field

from selfhost.models.base import StrictModel
from selfhost.services.base import Contribution, Service
from selfhost.services.web import WebService

__all__ = ["Contribution", "Service", "Services", "WebService"]


class Services(StrictModel):
    """The services this server runs. A service that is absent (or ``enabled: false``) is not
    installed, and its ports stay closed."""

    web: WebService | None = Field(
        default=None, description="Static web sites served by Caddy with automatic HTTPS."
    )

    def enabled(self) -> list[Service]:
        """Enabled services, in a stable order."""
        out: list[Service] = []
        for name in type(self).model_fields:
            svc = getattr(self, name)
            if isinstance(svc, Service) and svc.enabled:
                out.append(svc)
        return out
