"""What a service is, and what it contributes to a server.

Every service module in :mod:`selfhost.services` defines one model (a subclass of
:class:`Service`) and implements :meth:`Service.contribute`, returning a
:class:`Contribution`: packages, files, systemd units, firewall ports, fail2ban jails, data
paths to back up and DNS records. The compiler merges the contributions of all enabled
services; conflicts (two services on one port, two services writing one file) are errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from selfhost.models.base import SecretRef, StrictModel

if TYPE_CHECKING:
    from selfhost.models.server import Server

Proto = Literal["tcp", "udp"]


@dataclass(frozen=True, order=True)
class OpenPort:
    """A port a service listens on and needs open in the firewall."""

    port: int
    proto: Proto = "tcp"
    service: str = ""
    lan_only: bool = False
    comment: str = ""


@dataclass(frozen=True)
class ManagedFile:
    """A file the deploy writes in full. ``validate`` is a shell command run on the staged file
    (``{path}`` is replaced by its path) before it replaces the live one."""

    path: str
    content: str
    mode: str = "0644"
    owner: str = "root"
    group: str = "root"
    validate: str | None = None
    secret: SecretRef | None = None
    """If set, ``content`` is ignored: the file holds this secret (resolved on the deploying
    machine at deploy time, never in the plan, never in logs). Mode must be 0600 or 0400."""


@dataclass(frozen=True)
class ManagedDir:
    path: str
    mode: str = "0755"
    owner: str = "root"
    group: str = "root"


@dataclass(frozen=True)
class Unit:
    """A systemd unit that must be enabled and running.

    ``reload_on`` lists managed file paths: when any of them changes, the unit is reloaded
    (``reload=True``) or restarted."""

    name: str
    reload_on: tuple[str, ...] = ()
    reload: bool = True
    running: bool = True
    enabled: bool = True


@dataclass(frozen=True)
class Jail:
    """A fail2ban jail (filter shipped by fail2ban unless ``filter_content`` is given)."""

    name: str
    port: str
    filter: str | None = None
    logpath: str | None = None
    journalmatch: str | None = None
    maxretry: int | None = None


@dataclass(frozen=True)
class Command:
    """A shell command kept idempotent by a guard.

    It runs when ``unless`` (a shell test) fails, or, if ``on_change`` lists managed file
    paths, only when one of those files changed in this deploy."""

    name: str
    command: str
    unless: str | None = None
    on_change: tuple[str, ...] = ()
    after_files: bool = False
    """Run after the managed files are written (always true when ``on_change`` is set)."""

    @property
    def late(self) -> bool:
        return self.after_files or bool(self.on_change)


@dataclass(frozen=True)
class DnsRecord:
    name: str
    type: Literal["A", "AAAA", "CNAME", "MX", "TXT", "SRV", "CAA"]
    value: str


@dataclass(frozen=True)
class DataPath:
    """Data to back up, with how to make it consistent first."""

    path: str
    service: str
    before_backup: str | None = None  # e.g. a dump command
    stop_units: tuple[str, ...] = ()


@dataclass
class Contribution:
    """Everything a service adds to the server. The compiler merges these."""

    packages: list[str] = field(default_factory=list)
    directories: list[ManagedDir] = field(default_factory=list)
    files: list[ManagedFile] = field(default_factory=list)
    units: list[Unit] = field(default_factory=list)
    ports: list[OpenPort] = field(default_factory=list)
    jails: list[Jail] = field(default_factory=list)
    data: list[DataPath] = field(default_factory=list)
    dns: list[DnsRecord] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    sysctl: dict[str, str] = field(default_factory=dict)
    """Kernel settings the service needs that differ from the hardened defaults."""
    sync_dirs: list[tuple[str, str]] = field(default_factory=list)
    """(local source directory, remote destination) pairs uploaded as-is."""


class Service(StrictModel):
    """Base class of every service model."""

    kind: ClassVar[str] = ""
    """Key of the service under ``services:`` in the YAML file."""

    enabled: bool = Field(default=True, description="Deploy this service.")

    def contribute(self, server: Server) -> Contribution:  # pragma: no cover - abstract
        raise NotImplementedError
