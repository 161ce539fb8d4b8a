"""selfhost: describe a home server once, as typed data; get a hardened, backed-up Debian server.

Layers (each importable on its own):

- :mod:`selfhost.models` -- Pydantic models of a server and of a fleet of servers.
- :mod:`selfhost.services`, :mod:`selfhost.hardening` -- one module per service or control:
  its model, what it requests from the others and what it provides.
- :mod:`selfhost.compose` -- the request kinds and the router between modules.
- :mod:`selfhost.validation` -- every problem of a model, apart from compilation.
- :mod:`selfhost.compile` -- pure functions from a validated model to one plan per host.
- :mod:`selfhost.backend` -- the thin pyinfra layer that applies a plan to a host.
- :mod:`selfhost.config` -- YAML loading with precise, all-at-once error reporting.

The main types are importable from here, to build a model in Python::

    import selfhost as sh
    nas = sh.Server(hostname="nas", domain="home.arpa", admins=[sh.Admin(name="alice", ...)])
    plans = sh.compile_fleet(sh.validated_fleet(sh.Fleet(hosts={"nas": nas})))
"""

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Admin": "selfhost.models.server",
    "Addresses": "selfhost.models.server",
    "Server": "selfhost.models.server",
    "Fleet": "selfhost.models.fleet",
    "SecretRef": "selfhost.models.base",
    "BackupPolicy": "selfhost.models.backup",
    "Repository": "selfhost.models.backup",
    "Hardening": "selfhost.hardening",
    "Services": "selfhost.services",
    "WebService": "selfhost.services.web",
    "Site": "selfhost.services.web",
    "RadicaleService": "selfhost.services.radicale",
    "MonitoringService": "selfhost.services.monitoring",
    "AuthoritativeDnsService": "selfhost.services.knot",
    "CalendarUser": "selfhost.services.radicale",
    "Notify": "selfhost.notify",
    "SmtpRelay": "selfhost.notify",
    "Target": "selfhost.compile.target",
    "compile_fleet": "selfhost.compile.compiler",
    "compile_server": "selfhost.compile.compiler",
    "validated": "selfhost.validation",
    "validated_fleet": "selfhost.validation",
    "load_fleet": "selfhost.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Lazy: `import selfhost` stays cheap, and the layers import each other freely.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
