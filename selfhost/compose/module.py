"""The one interface of every module (services and hardening controls alike).

A module has three hooks, all pure:

- :meth:`Module.requests` -- what it asks of the others (and, for a provider, what it asks
  in turn once it has seen its incoming requests). It does not depend on the target, so
  validation can run it;
- :meth:`Module.assertions` -- problems with the model that only this module can see (a
  VPN-only port without a VPN, NAT asked of a firewall that is off), reported at the model
  path they are about;
- :meth:`Module.contribute` -- what it owns on the host (packages, files, units, commands),
  rendered for a given :class:`~selfhost.compile.target.Target`; a provider renders its
  incoming requests here.

Class attributes declare the wiring: ``provides`` (the request kinds it is the single
provider of) and ``uses`` (the kinds it may request). The router orders modules from these.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal, TypeVar

from selfhost.compose.requests import Request, Sendmail
from selfhost.compose.resources import Command, ManagedDir, ManagedFile, Unit

if TYPE_CHECKING:
    from selfhost.compile.target import Target
    from selfhost.compose.keys import KeyStore
    from selfhost.models.fleet import Fleet
    from selfhost.models.server import Server

Loc = tuple[str | int, ...]
R = TypeVar("R", bound=Request)


@dataclass(frozen=True)
class Problem:
    """Something wrong with the model, at the model path ``loc`` of the host it is about
    (``other``: the other side of a conflict). Warnings do not fail validation; the plan
    shows them."""

    loc: Loc
    message: str
    other: Loc | None = None
    severity: Literal["error", "warning"] = "error"


@dataclass
class Contribution:
    """What a module owns on its host. The compiler turns it into plan steps."""

    packages: list[str] = field(default_factory=list)
    directories: list[ManagedDir] = field(default_factory=list)
    files: list[ManagedFile] = field(default_factory=list)
    units: list[Unit] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    sync_dirs: list[tuple[str, str]] = field(default_factory=list)
    """(local source directory, remote destination) pairs uploaded as-is."""


@dataclass
class Env:
    """What a module sees: its host's model, the fleet, the requests routed so far."""

    server: Server
    host: str
    """The host's name in the fleet."""
    fleet: Fleet
    path: str = ""
    """Model path of the module being run (its requests' default origin)."""
    target: Target | None = None
    """The target (only in :meth:`Module.contribute`)."""
    keys: KeyStore | None = None
    """The controller's key store (only when compiling)."""
    routed: dict[type[Request], list[Request]] = field(default_factory=dict)

    def incoming(self, kind: type[R]) -> list[R]:
        """Requests of ``kind`` made so far on this host (for its provider: all of them)."""
        return [r for r in self.routed.get(kind, []) if isinstance(r, kind)]

    def has_sendmail(self) -> bool:
        """Whether a module provides ``/usr/sbin/sendmail`` on this host."""
        return bool(self.incoming(Sendmail))

    def require_target(self) -> Target:
        if self.target is None:
            raise RuntimeError(f"{self.path}: contribute() needs a target")
        return self.target


class Module:
    """Mixin of every service and hardening control model (and of the built-in modules)."""

    provides: ClassVar[tuple[type[Request], ...]] = ()
    uses: ClassVar[tuple[type[Request], ...]] = ()

    def requests(self, env: Env) -> Iterator[Request] | list[Request]:
        return []

    def assertions(self, env: Env) -> list[Problem]:
        return []

    def contribute(self, env: Env) -> Contribution:
        return Contribution()
