"""Model -> plans. Pure and deterministic: no target access, no pyinfra state.

``compile_fleet`` routes every host's modules (:mod:`selfhost.compose.route`), refuses a
model with validation errors, then asks each module for its contribution given the host's
:class:`Target` and turns them into one ordered plan per host.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from selfhost.compile.plan import (
    Directory,
    File,
    Packages,
    Plan,
    Reload,
    Removals,
    Run,
    Step,
    Sync,
    UnitState,
    User,
)
from selfhost.compile.removal import MANIFEST, manifest_text
from selfhost.compile.target import Target
from selfhost.compose.keys import FakeKeyStore, KeyStore
from selfhost.compose.module import Contribution, Problem
from selfhost.compose.requests import (
    CROSS_HOST,
    AbsentPackage,
    BackupSource,
    DnsRecord,
    HealthCheck,
    Jail,
    Port,
)
from selfhost.compose.resources import ManagedDir, ManagedFile
from selfhost.compose.route import Routed
from selfhost.hostcheck import EXPECTED, expected_tsv
from selfhost.models.fleet import Fleet

if TYPE_CHECKING:
    from selfhost.models.server import Server


class CompileError(ValueError):
    """The model cannot be compiled: ``problems`` by host (the same as validation's)."""

    def __init__(self, problems: dict[str, list[Problem]]) -> None:
        self.problems = problems
        lines = [f"{h}: {'.'.join(map(str, p.loc))}: {p.message}"
                 for h, ps in problems.items() for p in ps]
        super().__init__("; ".join(lines))


def collect(routed: Routed, fleet: Fleet, target: Target,
            keys: KeyStore | None = None) -> list[tuple[str, Contribution]]:
    """Every module's contribution for one host, with its model path, in routing order."""
    return [(path, module.contribute(routed.env(fleet, path, target, keys)))
            for path, module in routed.modules]


Prepared = tuple[dict[str, Routed], dict[str, list[Problem]]]
"""A fleet routed and validated (warnings by host): the target-free half of compilation."""


def prepare(fleet: Fleet) -> Prepared:
    """Route and validate a fleet once; raise :class:`CompileError` on any error."""
    from selfhost.validation import route, validate_fleet

    routed = route(fleet)  # once: validation and every host's plan use the same routing
    warnings = validate_fleet(fleet, routed)
    problems = {h: [p for p in ps if p.severity == "error"] for h, ps in warnings.items()}
    problems = {h: ps for h, ps in problems.items() if ps}
    if problems:
        raise CompileError(problems)
    return routed, warnings


def compile_fleet(fleet: Fleet, targets: dict[str, Target] | None = None,
                  keys: KeyStore | None = None, hosts: list[str] | None = None,
                  prepared: Prepared | None = None) -> dict[str, Plan]:
    """One plan per host (or per host of ``hosts``). ``keys`` is the controller's key store
    (default: stand-in keys, which never touch the disk). ``prepared``: the fleet's
    :func:`prepare` result, when the caller compiles its hosts one at a time (a deploy runs
    once per host: routing the whole fleet each time would cost the square of its size)."""
    routed, warnings = prepared if prepared is not None else prepare(fleet)
    keys = keys or FakeKeyStore()
    out: dict[str, Plan] = {}
    for host in hosts or list(fleet.hosts):
        target = (targets or {}).get(host) or Target()
        plan = build_plan(fleet.hosts[host], routed[host], collect(routed[host], fleet, target,
                                                                   keys), target)
        plan.host = host
        plan.notices = [f"{'.'.join(map(str, p.loc))}: {p.message}"
                        for p in warnings.get(host, [])]
        out[host] = plan
    return out


def compile_server(server: Server, target: Target | None = None,
                   keys: KeyStore | None = None) -> Plan:
    """The plan of a one-host model."""
    fleet = Fleet.of(server)
    return compile_fleet(fleet, {server.hostname: target or Target()}, keys)[server.hostname]


def expected_rows(parts: list[tuple[str, Contribution]], manifest: str,
                  health: list[HealthCheck] | None = None) -> list[tuple[str, ...]]:
    """What the on-host check compares: every managed file (a secret one by mode and owner
    only), every unit that must run, and every backup repository's largest age in hours."""
    import hashlib

    rows: list[tuple[str, ...]] = [("F", MANIFEST, hashlib.sha1(manifest.encode()).hexdigest(),
                                    "644", "root", "root")]
    for _, c in parts:
        for f in c.files:
            mode = f"{int(f.mode, 8):o}"
            if f.opaque:
                rows.append(("M", f.path, mode, f.owner, f.group))
            else:
                rows.append(("F", f.path, hashlib.sha1(f.content.encode()).hexdigest(), mode,
                             f.owner, f.group))
        rows += [("U", u.name) for u in c.units if u.running]
    rows += [("B", h.target, h.expect) for h in health or [] if h.kind == "backup"]
    return rows


def service_manifest(routed: Routed, parts: list[tuple[str, Contribution]]
                     ) -> dict[str, dict[str, list[str]]]:
    """What each service module owns on the host (for removal when it, or a part of it, leaves
    the model): the services, and the modules serving other hosts of the fleet (providers of a
    cross-host request kind: a tunnel's far end, a backup MX, a DNS secondary, a backup
    peer's accounts), whose part of the model is on those other hosts."""
    serving = {path for path, m in routed.modules
               if any(kind in CROSS_HOST for kind in m.provides)}
    data: dict[str, list[str]] = {}
    for r in routed.requests.get(BackupSource, []):
        if isinstance(r, BackupSource):
            owner = ".".join(r.origin.split(".")[:2])
            data.setdefault(owner, []).append(r.path)
    out: dict[str, dict[str, list[str]]] = {}
    for path, c in parts:
        if not (path.startswith("services.") or path in serving) or not (
                c.units or c.files or c.packages):
            continue
        out[path] = {"units": sorted(u.name for u in c.units),
                     "files": sorted({f.path for f in c.files}
                                     | {p for cmd in c.commands for p in cmd.creates}),
                     "packages": sorted(set(c.packages)),
                     "data": sorted(set(data.get(path, [])))}
    return out


def build_plan(server: Server, routed: Routed, parts: list[tuple[str, Contribution]],
               target: Target) -> Plan:
    """Turn a host's contributions into an ordered plan of steps."""
    plan = Plan(hostname=server.fqdn, release=target.release)
    steps: list[Step] = []

    packages: list[str] = []
    for _, c in parts:
        packages.extend(p for p in c.packages if p not in packages)
    absent = {a.name: a for a in routed.requests.get(AbsentPackage, [])
              if isinstance(a, AbsentPackage)}
    clash = [p for p in packages if p in absent]
    if clash:
        raise CompileError({routed.host: [Problem((), f"package {p} is installed by a module "
                                                  f"but {absent[p].origin} wants it absent")
                                          for p in clash]})
    steps.append(Packages(tuple(sorted(packages))))
    manifest = manifest_text(service_manifest(routed, parts))
    steps.append(Removals(manifest, server.removal.purge_packages))

    # Commands guarded by `unless` prepare the system (host keys, time zone) before files.
    for src, c in parts:
        steps += [Run(cmd, src) for cmd in c.commands if not cmd.late]

    for admin in sorted(server.admins, key=lambda a: a.name):
        pw = admin.password_hash
        steps.append(User(
            name=admin.name,
            groups=("sudo",) if admin.sudo else (),
            ssh_keys=tuple(admin.ssh_keys),
            password_hash=None if pw is None else pw if isinstance(pw, str)
            else f"secret:{pw.describe()}",
            password=None if admin.password is None else f"secret:{admin.password.describe()}",
        ))

    seen_files: dict[str, str] = {}
    steps.append(Directory(ManagedDir("/var/lib/selfhost", "0755"), "removal"))
    for src, c in parts:
        steps += [Directory(d, src) for d in c.directories]
    for src, c in parts:
        for f in c.files:
            if f.path in seen_files:
                raise CompileError({routed.host: [Problem(
                    (), f"{f.path} is written by both {seen_files[f.path]} and {src}")]})
            seen_files[f.path] = src
            steps.append(File(f, src))
    steps.append(File(ManagedFile(MANIFEST, manifest, mode="0644"), "removal"))
    if server.check.enabled:
        steps.append(File(ManagedFile(EXPECTED, expected_tsv(expected_rows(
            parts, manifest, [h for h in routed.requests.get(HealthCheck, [])
                              if isinstance(h, HealthCheck)]))),
                          "check"))
    for src, c in parts:
        steps += [Sync(s, d, src) for s, d in c.sync_dirs]
    for src, c in parts:
        steps += [Run(cmd, src) for cmd in c.commands if cmd.late]
    for _, c in parts:
        for unit in c.units:
            steps.append(UnitState(unit.name, running=unit.running, enabled=unit.enabled))
    for _, c in parts:
        for unit in c.units:
            if unit.reload_on:
                steps.append(Reload(unit.name, unit.reload_on,
                                    "reload" if unit.reload else "restart"))

    plan.steps = steps
    req = routed.requests
    plan.ports = sorted({p for p in req.get(Port, []) if isinstance(p, Port)},
                        key=lambda p: (p.port, p.proto, p.zone, p.origin))
    plan.jails = [j for j in req.get(Jail, []) if isinstance(j, Jail)] \
        if server.hardening.fail2ban.enabled else []
    plan.data = [d for d in req.get(BackupSource, []) if isinstance(d, BackupSource)]
    plan.data += [BackupSource(p, origin="backup.extra_paths")
                  for p in server.backup.extra_paths]
    plan.dns = [d for d in req.get(DnsRecord, []) if isinstance(d, DnsRecord)]
    plan.health = [h for h in req.get(HealthCheck, []) if isinstance(h, HealthCheck)]
    plan.disabled_controls = server.hardening.disabled()
    return plan
