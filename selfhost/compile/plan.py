"""The plan: an ordered, deterministic list of steps, independent of pyinfra.

Each step is a small frozen dataclass. ``Plan.to_data()`` gives plain data for fixture tests
and ``Plan.render()`` a readable listing for ``selfhost plan``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any

from selfhost.compose.requests import BackupSource, DnsRecord, HealthCheck, Jail, Port
from selfhost.compose.resources import Command, ManagedDir, ManagedFile


@dataclass(frozen=True)
class Packages:
    names: tuple[str, ...]

    def describe(self) -> str:
        return "install packages: " + " ".join(self.names)


@dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...]
    ssh_keys: tuple[str, ...]
    password_hash: str | None
    """A crypt hash, or ``secret:<where>`` to be resolved by the backend at deploy time."""
    password: str | None = None
    """``secret:<where>``: a plaintext password the backend reads at deploy time, checks for
    strength and hashes on the deploying machine (exclusive with ``password_hash``)."""

    def describe(self) -> str:
        pw = ", password hash set" if self.password_hash else ""
        if self.password:
            kind, _, where = self.password.removeprefix("secret:").partition(":")
            pw = f", password set from {kind} {where}, strength-checked"
        return (f"admin user {self.name} (groups: {', '.join(self.groups) or '-'}; "
                f"{len(self.ssh_keys)} SSH key(s){pw})")


@dataclass(frozen=True)
class Directory:
    dir: ManagedDir
    source: str

    def describe(self) -> str:
        d = self.dir
        return f"directory {d.path} ({d.owner}:{d.group} {d.mode})"


@dataclass(frozen=True)
class File:
    file: ManagedFile
    source: str

    @property
    def sha1(self) -> str:
        return hashlib.sha1(self.file.content.encode()).hexdigest()

    def describe(self) -> str:
        f = self.file
        if f.secret_file is not None:
            return f"secret file {f.path} ({f.owner}:{f.group} {f.mode}, from the controller's " \
                f"key store)"
        if f.host_key_of is not None:
            return (f"file {f.path} ({f.mode}): known_hosts entry of {f.host_key_of[0]}, its host "
                    "key read from it at deploy time")
        if f.secret is not None:
            return f"secret file {f.path} ({f.owner}:{f.group} {f.mode}, from {f.secret.describe()})"
        check = f", checked with `{f.validate.split(' ')[0]}`" if f.validate else ""
        if f.secrets:
            check += f", {len(f.secrets)} secret(s) filled in at deploy time"
        return f"file {f.path} ({f.owner}:{f.group} {f.mode}, {len(f.content)} bytes{check})"


@dataclass(frozen=True)
class Sync:
    src: str
    dest: str
    source: str

    def describe(self) -> str:
        return f"upload directory {self.src} -> {self.dest}"


@dataclass(frozen=True)
class Run:
    command: Command
    source: str

    def describe(self) -> str:
        c = self.command
        when = (f" when {', '.join(c.on_change)} changed" if c.on_change
                else " unless already done" if c.unless else "")
        return f"run: {c.name}{when}"


@dataclass(frozen=True)
class UnitState:
    name: str
    running: bool = True
    enabled: bool = True

    def describe(self) -> str:
        return (f"unit {self.name}: {'enabled' if self.enabled else 'disabled'}, "
                f"{'running' if self.running else 'stopped'}")


@dataclass(frozen=True)
class Reload:
    unit: str
    when: tuple[str, ...]
    action: str = "reload"

    def describe(self) -> str:
        return f"{self.action} {self.unit} when {', '.join(self.when)} changed"


@dataclass(frozen=True)
class Removals:
    """Undo the services that left the model since the last deploy (see
    :mod:`selfhost.compile.removal`): the new manifest, compared on the target with the
    previous one."""

    manifest: str
    purge_packages: bool = False

    def describe(self) -> str:
        how = "purged" if self.purge_packages else "left installed"
        return ("remove services that left the model since the last deploy (units stopped, "
                f"configuration removed, packages {how}, data kept)")


Step = Packages | User | Directory | File | Sync | Run | UnitState | Reload | Removals


@dataclass
class Plan:
    hostname: str
    release: str
    steps: list[Step] = field(default_factory=list)
    ports: list[Port] = field(default_factory=list)
    jails: list[Jail] = field(default_factory=list)
    data: list[BackupSource] = field(default_factory=list)
    dns: list[DnsRecord] = field(default_factory=list)
    health: list[HealthCheck] = field(default_factory=list)
    disabled_controls: list[tuple[str, str]] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    """Warnings of validation (requests a switched-off control does not honour, ...)."""
    host: str = ""
    """The host's name in the fleet."""

    def files(self) -> dict[str, str]:
        """Rendered files by path."""
        return {s.file.path: s.file.content for s in self.steps if isinstance(s, File)}

    def to_data(self) -> dict[str, Any]:
        def step_data(step: Step) -> dict[str, Any]:
            d = dataclasses.asdict(step)
            if isinstance(step, Removals):
                d["manifest"] = hashlib.sha1(step.manifest.encode()).hexdigest()
            if isinstance(step, File):
                d["file"].pop("content")
                if step.file.secret is not None:
                    d["file"]["secret"] = step.file.secret.describe()
                d["file"]["secrets"] = [f"{p.ref.describe()} ({p.transform})"
                                        for p in step.file.secrets]
                d["sha1"] = step.sha1
            return {"step": type(step).__name__, **d}

        return {
            "hostname": self.hostname,
            "release": self.release,
            "steps": [step_data(s) for s in self.steps],
            "ports": [dataclasses.asdict(p) for p in self.ports],
            "jails": [j.name for j in self.jails],
            "data": [dataclasses.asdict(d) for d in self.data],
            "dns": [dataclasses.asdict(r) for r in self.dns],
            "health": [dataclasses.asdict(h) for h in self.health],
            "disabled_controls": [list(x) for x in self.disabled_controls],
            "notices": list(self.notices),
        }

    def render(self) -> str:
        name = f"{self.host} ({self.hostname})" if self.host and self.host != \
            self.hostname.split(".")[0] else self.hostname
        out = [f"Plan for {name} (Debian {self.release}): {len(self.steps)} steps", ""]
        for i, step in enumerate(self.steps, 1):
            out.append(f"{i:3d}. {step.describe()}")
        out += ["", "Open ports (derived from the model):"]
        for p in self.ports:
            scope = f" ({p.zone.upper()} only)" if p.zone != "internet" else ""
            why = f" ({p.comment})" if p.comment else ""
            out.append(f"  {p.port}/{p.proto}  {p.origin}{scope}{why}")
        out += ["", "fail2ban jails: " + (", ".join(j.name for j in self.jails) or "none")]
        out += ["", "Data to back up:"]
        out += [f"  {d.path}  ({d.origin})" for d in self.data] or ["  (none)"]
        out += ["", "DNS records to publish:"]
        out += [f"  {r.name} {r.type} {r.value}" for r in self.dns] or ["  (none)"]
        if self.health:
            out += ["", "Health checks (selfhost check):"]
            out += [f"  {h.kind} {h.target}  ({h.origin})" for h in self.health]
        if self.notices:
            out += ["", "Notices:"]
            out += [f"  {n}" for n in self.notices]
        if self.disabled_controls:
            out += ["", "Hardening controls turned OFF:"]
            out += [f"  {name}: {reason}" for name, reason in self.disabled_controls]
        return "\n".join(out) + "\n"
