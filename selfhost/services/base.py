"""What a service is.

Every service module in :mod:`selfhost.services` defines one model, a subclass of
:class:`Service`, which is a :class:`~selfhost.compose.module.Module`: it requests what it
needs from the other modules (:mod:`selfhost.compose.requests`: a virtual host, a system
user, a backup source, ...), may provide request kinds itself, and contributes what it owns
(packages, files, units). A service module never imports another service module.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from selfhost.compose.module import Contribution, Env, Module, Problem
from selfhost.compose.resources import Command, ManagedDir, ManagedFile, Unit
from selfhost.models.base import StrictModel

__all__ = ["Command", "Contribution", "Env", "ManagedDir", "ManagedFile", "Problem", "Service",
           "Unit", "container_dropin"]


def container_dropin(c: Contribution, module: str, unit: str, why: str,
                     settings: str) -> str:
    """Add to ``c`` a systemd drop-in for ``unit`` that only containers get (the caller
    checks ``env.require_target().in_container``): ``settings``, lines of its ``[Service]``
    section, after the comment ``why``; systemd's configuration is reloaded when it changes.
    Returns the drop-in's path (for a unit's ``reload_on``, if it needs a restart)."""
    path = f"/etc/systemd/system/{unit}.d/selfhost-container.conf"
    c.files.append(ManagedFile(path, f"# Managed by selfhost: {why}\n[Service]\n{settings}"))
    c.commands.append(Command(f"{module}: reload systemd units", "systemctl daemon-reload",
                              on_change=(path,)))
    return path


class Service(StrictModel, Module):
    """Base class of every service model."""

    kind: ClassVar[str] = ""
    """Key of the service under ``services:`` in the YAML file."""

    enabled: bool = Field(default=True, description="Deploy this service.")
