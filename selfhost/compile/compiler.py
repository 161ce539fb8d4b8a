"""Model -> plan. Pure and deterministic: no target access, no pyinfra state."""

from __future__ import annotations

from typing import TYPE_CHECKING

from selfhost import notify
from selfhost.apt import APT_GET
from selfhost.backup import restic
from selfhost.compile.plan import (
    Directory,
    File,
    Packages,
    Plan,
    Reload,
    Run,
    Step,
    Sync,
    UnitState,
    User,
)
from selfhost.compile.target import Target
from selfhost.services.base import Command, Contribution, ManagedFile

if TYPE_CHECKING:
    from selfhost.models.server import Server

SUDOERS = "/etc/sudoers.d/selfhost-admins"
BASE_PACKAGES = ["tzdata", "sudo", "ca-certificates", "curl"]
TIME_DAEMONS = ("systemd-timesyncd", "chrony", "ntpsec", "ntp", "openntpd")

HOST_KEYS = Command(
    "ssh host keys: Ed25519 and RSA 4096 only",
    "test -f /etc/ssh/ssh_host_ed25519_key || "
    "ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key; "
    "ssh-keygen -l -f /etc/ssh/ssh_host_rsa_key.pub 2>/dev/null | awk '{exit !($1>=4096)}' || "
    "{ rm -f /etc/ssh/ssh_host_rsa_key /etc/ssh/ssh_host_rsa_key.pub; "
    "ssh-keygen -q -t rsa -b 4096 -N '' -f /etc/ssh/ssh_host_rsa_key; }; "
    "rm -f /etc/ssh/ssh_host_ecdsa_key* /etc/ssh/ssh_host_dsa_key*",
    unless="test -f /etc/ssh/ssh_host_ed25519_key && "
    "ssh-keygen -l -f /etc/ssh/ssh_host_rsa_key.pub 2>/dev/null | awk '{exit !($1>=4096)}' && "
    "! ls /etc/ssh/ssh_host_ecdsa_key* /etc/ssh/ssh_host_dsa_key* >/dev/null 2>&1",
)
MODULI = Command(
    "ssh: remove Diffie-Hellman moduli under 3072 bits",
    "awk '$1 !~ /^[0-9]+$/ || $5 >= 3071' /etc/ssh/moduli > /etc/ssh/moduli.selfhost-new && "
    "mv /etc/ssh/moduli.selfhost-new /etc/ssh/moduli",
    unless="awk '$1 ~ /^[0-9]+$/ && $5 < 3071 {bad=1} END {exit bad}' /etc/ssh/moduli",
)


def _base(server: Server) -> Contribution:
    c = Contribution(packages=list(BASE_PACKAGES))
    tz = server.timezone
    c.commands.append(Command(
        f"time zone {tz}",
        f"ln -sf /usr/share/zoneinfo/{tz} /etc/localtime && echo {tz} > /etc/timezone",
        unless=f'test "$(readlink /etc/localtime)" = /usr/share/zoneinfo/{tz} && '
        f"grep -qx {tz} /etc/timezone",
    ))
    if server.time_sync:
        # A guarded command, not a package: systemd-timesyncd conflicts with the other time
        # daemons, and apt would remove the admin's chrony to install it.
        c.commands.append(Command(
            "time sync: systemd-timesyncd (NTP)",
            f"export DEBIAN_FRONTEND=noninteractive; i='{APT_GET} install -y -qq "
            "--no-install-recommends systemd-timesyncd'; "
            f"$i >/dev/null 2>&1 || {{ {APT_GET} update -qq && $i >/dev/null; }}",
            unless=f"dpkg-query -W -f='${{Status}}\\n' {' '.join(TIME_DAEMONS)} "
            "2>/dev/null | grep -q 'ok installed'",
        ))
    name = server.hostname
    c.commands.append(Command(
        f"host name {name}",
        f"hostnamectl set-hostname {name} 2>/dev/null || {{ echo {name} > /etc/hostname; "
        f"hostname {name} 2>/dev/null || echo 'selfhost: the running host name cannot be "
        "changed here (a container?); /etc/hostname is set for the next boot' >&2; }",
        unless=f"grep -qx {name} /etc/hostname && "
        f'{{ test "$(hostname)" = {name} || systemd-detect-virt --container --quiet; }}',
    ))
    lines = ["# Managed by selfhost: the admins from the model."]
    for admin in sorted(server.admins, key=lambda a: a.name):
        if admin.sudo:
            nopasswd = "" if admin.has_password else "NOPASSWD: "
            lines.append(f"{admin.name} ALL=(ALL:ALL) {nopasswd}ALL")
    c.files.append(ManagedFile(SUDOERS, "\n".join(lines) + "\n", mode="0440",
                               validate="visudo -cqf {path}"))
    return c


def collect(server: Server, target: Target) -> list[tuple[str, Contribution]]:
    """Every contribution, with the model path of its source, in a fixed order."""
    h = server.hardening
    out: list[tuple[str, Contribution]] = [("base", _base(server))]
    if server.notify is not None:
        out.append(("notify", notify.contribute(server)))
    ssh = h.ssh.contribute(server, target)
    if h.ssh.enabled:
        ssh.commands[:0] = [HOST_KEYS, MODULI]
    out.append(("hardening.ssh", ssh))
    out.append(("hardening.updates", h.updates.contribute(server, target)))
    out.append(("hardening.accounts", h.accounts.contribute(server, target)))
    out.append(("hardening.minimal", h.minimal.contribute(server, target)))
    out.append(("hardening.audit", h.audit.contribute(server, target)))
    for name in type(server.services).model_fields:
        svc = getattr(server.services, name)
        if svc is not None and svc.enabled:
            out.append((f"services.{name}", svc.contribute(server)))
    # Backups of every data path contributed so far (plus backup.extra_paths).
    data = [d for _, c in out for d in c.data]
    out.append(("backup", restic.contribute(server, target, data)))
    # Controls derived from what the others contribute.
    ports = [p for _, c in out for p in c.ports]
    jails = [j for _, c in out for j in c.jails]
    service_sysctl = {k: (v, src) for src, c in out for k, v in c.sysctl.items()}
    out.append(("hardening.kernel", h.kernel.contribute_with(server, target, service_sysctl)))
    out.append(("hardening.fail2ban", h.fail2ban.contribute_jails(server, target, jails)))
    out.append(("hardening.firewall", h.firewall.contribute_rules(server, target, ports)))
    return out


def compile_server(server: Server, target: Target | None = None) -> Plan:
    """Turn a validated model into an ordered plan of steps."""
    target = target or Target()
    parts = collect(server, target)
    plan = Plan(hostname=server.fqdn, release=target.release)
    steps: list[Step] = []

    packages: list[str] = []
    for _, c in parts:
        packages.extend(p for p in c.packages if p not in packages)
    steps.append(Packages(tuple(sorted(packages))))

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
    for src, c in parts:
        steps += [Directory(d, src) for d in c.directories]
    for src, c in parts:
        for f in c.files:
            if f.path in seen_files:
                raise ValueError(f"{f.path} is written by both {seen_files[f.path]} and {src}")
            seen_files[f.path] = src
            steps.append(File(f, src))
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
    for _, c in parts:
        plan.ports += c.ports
        plan.jails += c.jails
        plan.data += c.data
        plan.dns += c.dns
    plan.ports = sorted(set(plan.ports), key=lambda p: (p.port, p.proto, p.service))
    if not server.hardening.fail2ban.enabled:
        plan.jails = []
    plan.disabled_controls = server.hardening.disabled()
    return plan
