"""Typed models of a server. Every field has a description and a safe default.

The top-level model is :class:`selfhost.models.server.Server`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Admin", "BackupPolicy", "SecretRef", "Server", "StrictModel"]


def __getattr__(name: str) -> Any:
    # Imported lazily: services and hardening modules import selfhost.models.base, and the
    # server model imports them.
    if name in ("Admin", "Server"):
        from selfhost.models import server

        return getattr(server, name)
    if name == "BackupPolicy":
        from selfhost.models.backup import BackupPolicy

        return BackupPolicy
    if name in ("SecretRef", "StrictModel"):
        from selfhost.models import base

        return getattr(base, name)
    raise AttributeError(name)
