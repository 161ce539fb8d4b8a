"""Typed models of a server. Every field has a description and a safe default."""

from selfhost.models.backup import BackupPolicy
from selfhost.models.base import SecretRef, StrictModel
from selfhost.models.server import Admin, Server

__all__ = ["Admin", "BackupPolicy", "SecretRef", "Server", "StrictModel"]
