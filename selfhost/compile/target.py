"""What the compiler needs to know about the target, gathered by the deploy (or given by hand).

Keeping this explicit keeps compilation pure: the same model and target give the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Release = Literal["bookworm", "trixie"]
RELEASES: tuple[Release, ...] = ("bookworm", "trixie")


@dataclass(frozen=True)
class Target:
    release: Release = "bookworm"
    """Debian release codename (decides e.g. the OpenSSH crypto lists)."""
    in_container: bool = False
    """Kernel settings that a container cannot change are skipped, not failed."""
    keep_open_ports: tuple[int, ...] = field(default_factory=tuple)
    """TCP ports to keep open whatever the model says: the SSH port the deploy is using now."""
