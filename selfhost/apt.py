"""Debian's package manager as the deploy calls it: when another apt, dpkg or
unattended-upgrades run holds its lock, wait for it (bounded) instead of failing at once."""

from __future__ import annotations

LOCK_TIMEOUT = 600
"""Seconds a deploy waits for a busy package manager before it gives up."""

APT_GET = f"apt-get -o DPkg::Lock::Timeout={LOCK_TIMEOUT}"
"""``apt-get`` that waits for dpkg's lock (apt >= 1.9.11: Debian 12 and 13)."""
