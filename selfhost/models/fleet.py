"""A fleet: several hosts in one model (the home server, the friend's backup host, ...).

A file with a top-level ``hosts:`` mapping is a fleet; a file describing one server (with
``hostname:`` at the top) is a fleet of one, unchanged. ``defaults:`` holds settings every
host gets unless it sets them itself (mappings are merged key by key, lists and values are
replaced): typically the admins and the hardening choices.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, PrivateAttr, field_validator

from selfhost.models.base import StrictModel
from selfhost.models.server import Server

_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


class Fleet(StrictModel):
    """Several hosts described together, so that relations between them (backups kept by a
    friend's host, later a backup MX or VPN peers) are written once and both ends follow."""

    defaults: dict[str, Any] = Field(
        default_factory=dict,
        description="Settings every host gets unless it sets them itself (any key of a host: "
        "admins, hardening, timezone, ...). Mappings merge key by key; lists and values are "
        "replaced by the host's own.",
    )
    hosts: dict[str, Server] = Field(
        min_length=1,
        description="The hosts, by name (the name deploys use in host data `selfhost_host`, "
        "and other hosts use to refer to this one, e.g. a backup repository's `peer`).",
    )

    _warnings: list[Any] = PrivateAttr(default_factory=list)

    @property
    def warnings(self) -> list[Any]:
        """Validation warnings (as located issues, when loaded from a file)."""
        return self._warnings

    @warnings.setter
    def warnings(self, value: list[Any]) -> None:
        self._warnings = value

    @field_validator("hosts")
    @classmethod
    def _names(cls, v: dict[str, Server]) -> dict[str, Server]:
        for name in v:
            if not _NAME.match(name):
                raise ValueError(f"host name {name!r}: use one DNS label (a-z, 0-9, '-')")
        return v

    def find(self, name: str) -> str | None:
        """The fleet name of the host called ``name`` (its fleet name, host name or FQDN)."""
        if name in self.hosts:
            return name
        for key, server in self.hosts.items():
            if name in (server.hostname, server.fqdn):
                return key
        return None

    @classmethod
    def of(cls, server: Server) -> Fleet:
        """A fleet of one host (named after its host name)."""
        return cls.model_construct(defaults={}, hosts={server.hostname: server})
