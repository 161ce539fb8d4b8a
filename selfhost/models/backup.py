"""Backup policy (restic). The model is here; see the backup issue for what is deployed."""

from __future__ import annotations

from pydantic import Field

from selfhost.models.base import StrictModel


class BackupPolicy(StrictModel):
    """Where and how often the server's data is backed up."""

    enabled: bool = Field(
        default=False,
        description="Back up the data paths of every enabled service (restic repositories).",
    )
    extra_paths: list[str] = Field(
        default_factory=list, description="Additional absolute paths to back up."
    )
    exclude: list[str] = Field(default_factory=list, description="Patterns to exclude.")
