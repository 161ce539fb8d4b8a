"""What would change: one pure function of (plan step, target state).

The pyinfra operations (:mod:`selfhost.backend.pyinfra`) turn these changes into commands,
and ``selfhost check`` reports them as drift; neither decides on its own what differs. The
state is the batched read of :mod:`selfhost.state` (plain data, no connection).
Secrets are compared by hash only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from selfhost.compile.plan import (
    Directory,
    File,
    Packages,
    Reload,
    Removals,
    Run,
    Step,
    Sync,
    UnitState,
    User,
)
from selfhost.state import State

Kind = Literal["install-packages", "write-file", "fix-file-meta", "make-dir", "run",
               "create-user", "user-groups", "user-drop-sudo", "user-shell", "user-password",
               "enable-unit", "start-unit", "reload-unit", "remove-services"]


@dataclass(frozen=True)
class Change:
    """One difference between a step and the target, and what the deploy does about it."""

    kind: Kind
    target: str
    detail: str = ""

    def describe(self) -> str:
        return f"{self.kind} {self.target}" + (f": {self.detail}" if self.detail else "")


def file_change(path: str, content_sha1: str, mode: str, owner: str, group: str,
                state: State) -> Change | None:
    """A managed file: absent or different content (rewrite), or only its metadata."""
    current = state.files.get(path)
    if current is None:
        return Change("write-file", path, "absent")
    if current.sha1 != content_sha1:
        return Change("write-file", path, "content differs")
    if (current.mode, current.owner, current.group) != (mode, owner, group):
        return Change("fix-file-meta", path, f"{current.owner}:{current.group} {current.mode}"
                      f" -> {owner}:{group} {mode}")
    return None


def dir_change(path: str, mode: str, owner: str, group: str, state: State) -> Change | None:
    current = state.dirs.get(path)
    if current is not None and (current.mode, current.owner, current.group) == (mode, owner, group):
        return None
    return Change("make-dir", path, "absent" if current is None else
                  f"{current.owner}:{current.group} {current.mode} -> {owner}:{group} {mode}")


def missing_packages(names: tuple[str, ...], state: State) -> list[str]:
    return [n for n in names if not state.packages.get(n)]


def unit_changes(name: str, enabled: bool, running: bool, state: State) -> list[Change]:
    is_enabled, is_active = state.units.get(name, ("", ""))
    out = []
    if enabled and is_enabled not in ("enabled", "static", "alias"):
        out.append(Change("enable-unit", name, is_enabled or "unknown"))
    if running and is_active != "active":
        out.append(Change("start-unit", name, is_active or "unknown"))
    return out


def user_changes(name: str, groups: tuple[str, ...], password_hash: str | None,
                 state: State) -> list[Change]:
    """An admin login (its SSH keys are a managed file, compared separately)."""
    current = state.users.get(name)
    out: list[Change] = []
    if current is None:
        out.append(Change("create-user", name))
    else:
        if "sudo" in current.groups and "sudo" not in groups:
            out.append(Change("user-drop-sudo", name))
        missing = [g for g in groups if g not in current.groups]
        if missing:
            out.append(Change("user-groups", name, ",".join(missing)))
        if current.shell != "/bin/bash":
            out.append(Change("user-shell", name, current.shell))
    if password_hash is not None and (
            current is None or current.shadow_sha1 != hashlib.sha1(
                f"{password_hash}\n".encode()).hexdigest()):
        out.append(Change("user-password", name, "differs"))
    return out


def step_changes(step: Step, state: State, changed: set[str] | None = None,
                 files: dict[str, bytes] | None = None) -> list[Change]:
    """Every change the deploy would make for ``step`` on a target in ``state``.

    ``files``: the content of managed files by path (secrets resolved), when known; without
    it, a file's plan content is used (a secret file then always differs). ``changed``: the
    managed files rewritten earlier in the same deploy (reloads, on-change commands)."""
    changed = changed or set()
    if isinstance(step, Packages):
        missing = missing_packages(step.names, state)
        return [Change("install-packages", " ".join(missing))] if missing else []
    if isinstance(step, File):
        f = step.file
        data = (files or {}).get(f.path, f.content.encode())
        ch = file_change(f.path, hashlib.sha1(data).hexdigest(), f.mode, f.owner, f.group,
                         state)
        return [ch] if ch else []
    if isinstance(step, Directory):
        d = step.dir
        ch = dir_change(d.path, d.mode, d.owner, d.group, state)
        return [ch] if ch else []
    if isinstance(step, Run):
        c = step.command
        if c.on_change:
            return [Change("run", c.name, "a file changed")] if changed.intersection(
                c.on_change) else []
        if c.unless is not None and state.guards.get(c.unless):
            return []
        return [Change("run", c.name, "its guard does not hold" if c.unless else "")]
    if isinstance(step, UnitState):
        return unit_changes(step.name, step.enabled, step.running, state)
    if isinstance(step, Reload):
        return ([Change("reload-unit", step.unit, ", ".join(sorted(changed & set(step.when))))]
                if changed.intersection(step.when) else [])
    if isinstance(step, User):
        hash_ = step.password_hash if not (step.password_hash or "").startswith("secret:") \
            else None
        return user_changes(step.name, step.groups, hash_, state)
    if isinstance(step, Removals):
        from selfhost.compile.removal import removed

        gone = removed(state.manifest, step.manifest)
        return [Change("remove-services", ", ".join(r.label for r in gone))] if gone else []
    if isinstance(step, Sync):
        return []  # expanded into files by the deploy
    return []
