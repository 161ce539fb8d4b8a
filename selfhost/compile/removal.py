"""Removal: what a deploy undoes when a service leaves the model.

Every plan carries a manifest of what each service module owns on the host (units, files,
packages, data) and writes it to :data:`MANIFEST`. The next deploy reads the previous
manifest back (in the same batched state query) and, for each service that is no longer in
the model, stops and disables its units, removes its configuration files (only those no
Debian package owns: a package's conffile is left to the package), and purges its packages
when the model asks for it (``removal.purge_packages``), never one the new plan still needs.
Its data is never deleted: the deploy says where it stays.

A service still in the model can lose a part too (a member of an association, a WireGuard
tunnel to a friend's host, a backup account kept for another host of the fleet): the units
and files it owned before and no module of the new plan owns any more are undone the same
way. The manifest covers the services (``services.*``) and the modules that serve other hosts
of the fleet (their cross-host requests: a tunnel's far end, a backup MX, a DNS secondary, a
backup peer's account), whose part of the model is on the other host.

Both functions are pure: the backend runs their commands; ``selfhost check`` can show them.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from typing import Any

MANIFEST = "/var/lib/selfhost/manifest.json"
REMOVED = "/var/lib/selfhost/removed.tsv"
"""One line per service removed by a deploy: path, date, data kept (``selfhost check``)."""


@dataclass(frozen=True)
class Removed:
    """A service of the previous deploy that is not in the model any more."""

    path: str
    units: tuple[str, ...]
    files: tuple[str, ...]
    packages: tuple[str, ...]
    data: tuple[str, ...]
    partial: bool = False
    """Only a part of the service left the model (the service itself is still there)."""

    @property
    def label(self) -> str:
        """What left the model, as the deploy log and ``selfhost check`` name it."""
        if not self.partial:
            return self.path
        return f"part of {self.path} ({', '.join(self.units or self.files)})"

    def describe(self) -> str:
        kept = ", ".join(self.data) or "nothing"
        return (f"{self.label} was removed from the model: units "
                f"{', '.join(self.units) or '-'} stopped and disabled; its data is kept: {kept}")


def manifest_text(modules: dict[str, dict[str, list[str]]]) -> str:
    return json.dumps({"version": 1, "services": modules}, indent=1, sort_keys=True) + "\n"


def parse_manifest(text: str | None) -> dict[str, dict[str, list[str]]]:
    """The services of a manifest (nothing for a missing or unreadable one)."""
    if not text:
        return {}
    try:
        data: Any = json.loads(text)
        services = data.get("services", {}) if isinstance(data, dict) else {}
    except ValueError:
        return {}
    return {str(k): v for k, v in services.items() if isinstance(v, dict)}


def removed(old_text: str | None, new_text: str) -> list[Removed]:
    """The services in the previous manifest that the new one lacks."""
    old, new = parse_manifest(old_text), parse_manifest(new_text)
    still_units = {u for m in new.values() for u in m.get("units", [])}
    still_files = {f for m in new.values() for f in m.get("files", [])}
    still_packages = {p for m in new.values() for p in m.get("packages", [])}
    out = []
    for path in sorted(old):
        m = old[path]
        units = tuple(u for u in m.get("units", []) if u not in still_units)
        files = tuple(f for f in m.get("files", []) if f not in still_files)
        if path not in new:
            out.append(Removed(
                path, units, files,
                tuple(p for p in m.get("packages", []) if p not in still_packages),
                tuple(m.get("data", [])),
            ))
        elif units or files:
            # The service stays: its packages stay too, and only the data paths it no longer
            # backs up are named as kept.
            kept = set(new[path].get("data", []))
            out.append(Removed(path, units, files, (),
                               tuple(d for d in m.get("data", []) if d not in kept),
                               partial=True))
    return out


def removal_commands(r: Removed, purge: bool, all_packages: tuple[str, ...]) -> list[str]:
    """Shell commands that undo a removed service (its data is never touched)."""
    q = shlex.quote
    cmds = []
    for unit in r.units:
        cmds.append(f"systemctl disable --now {q(unit)} >/dev/null 2>&1 || true")
    for path in r.files:
        cmds.append(f"dpkg-query -S {q(path)} >/dev/null 2>&1 || rm -f {q(path)}")
    packages = [p for p in r.packages if p not in all_packages]
    if purge and packages:
        cmds.append("DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq "
                    + " ".join(q(p) for p in packages) + " >/dev/null")
    record = f"{r.label}\t$(date -u +%Y-%m-%dT%H:%MZ)\t{' '.join(r.data) or '-'}"
    cmds.append(f"mkdir -p {q(REMOVED.rsplit('/', 1)[0])} && printf '%s\\n' \"{record}\" >> "
                f"{q(REMOVED)}")
    return cmds
