"""``selfhost check``: is the server still what the model says, and is it healthy?

One batched round trip reads the target: the state every plan step depends on (the same
script as a deploy's, :mod:`selfhost.state`), the content of the managed files that differ
from the plan (never a secret file's), and the health facts (failed units, disks, memory,
pending updates and reboot, time sync, listening sockets, and each module's health-check
requests). The Debian release is read by the same script, so the query covers the plans of
both supported releases and the findings use the one the target runs.

Findings come from :func:`selfhost.compile.diff.step_changes` (drift: what a deploy would
change) and from the health facts. Exit status: 0 all good, 1 warnings, 2 drift or failures,
3 the target could not be checked.
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import json
import re
import shlex
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

from selfhost.audit import is_loopback, parse_ss
from selfhost.backup.restic import STATE as BACKUP_STATE
from selfhost.compile.diff import step_changes
from selfhost.compile.plan import File, Packages, Plan, Run, Sync, UnitState, User
from selfhost.compile.removal import REMOVED
from selfhost.compile.target import RELEASES, Target
from selfhost.compose.requests import MAILQUEUE_OLD
from selfhost.hardening.kernel import SYSCTL_CONF
from selfhost.hardening.updates import COUNT_SECURITY_UPDATES, FRESH_COUNT, PENDING_CACHE
from selfhost.state import Query, State, parse, script

if TYPE_CHECKING:
    from selfhost.models.fleet import Fleet

EXIT_OK, EXIT_WARN, EXIT_FAIL, EXIT_UNCHECKED = 0, 1, 2, 3
DISK_WARN, DISK_FAIL = 85, 95
"""Percent of blocks or inodes used."""
SEVERITIES = ("error", "warning", "info")
SYSTEM_MOUNTS = re.compile(r"^/(dev|run|sys|proc)(/|$)")
"""Mount points whose use is the system's business (tmpfs for runtime state): not checked. A
tmpfs elsewhere (/tmp, a data directory) is: a full /tmp breaks programs as surely."""


@dataclass(frozen=True)
class Finding:
    severity: Literal["error", "warning", "info"]
    area: Literal["drift", "health", "exposure"]
    what: str
    todo: str
    diff: str = ""


def expected_files(plan: Plan) -> dict[str, bytes]:
    """The content each managed file must have, where it can be known without a secret."""
    out: dict[str, bytes] = {}
    for s in plan.steps:
        if isinstance(s, File) and not s.file.opaque:
            out[s.file.path] = s.file.content.encode()
    return out


def planned_sysctls(plan: Plan) -> dict[str, str]:
    """Kernel settings the plan writes (key -> value, blanks folded), from its sysctl file."""
    out: dict[str, str] = {}
    for s in plan.steps:
        if isinstance(s, File) and s.file.path == SYSCTL_CONF:
            for line in s.file.content.splitlines():
                key, eq, value = line.partition("=")
                if eq and not line.lstrip().startswith(("#", ";")):
                    out[key.strip()] = " ".join(value.split())
    return out


def _sysctl_script(keys: list[str]) -> list[str]:
    """Shell printing, for the given keys, the value systemd-sysctl sets at boot and the file
    that sets it last (``H sysctl-boot KEY VALUE FILE``), and the live value of those the
    kernel lets this host change (``H sysctl-now KEY VALUE``: not in a container, whose
    /proc/sys is read-only)."""
    if not keys:
        return []
    q = shlex.quote
    awk = ("BEGIN { n = split(keys, a, \" \"); for (i = 1; i <= n; i++) want[a[i]] = 1 } "
           "/^# \\// { f = $2; next } "
           "/^[ \\t]*-?[A-Za-z]/ { l = $0; sub(/^[ \\t]*-/, \"\", l); i = index(l, \"=\"); "
           "if (!i) next; k = substr(l, 1, i - 1); v = substr(l, i + 1); "
           "gsub(/^[ \\t]+|[ \\t]+$/, \"\", k); gsub(/^[ \\t]+|[ \\t]+$/, \"\", v); "
           "gsub(/[ \\t]+/, \" \", v); gsub(\"/\", \".\", k); "
           "if (k in want) { val[k] = v; src[k] = f } } "
           "END { for (k in val) printf \"H\\tsysctl-boot\\t%s\\t%s\\t%s\\n\", k, val[k], src[k] }")
    joined = " ".join(keys)
    return [
        f"/usr/lib/systemd/systemd-sysctl --cat-config 2>/dev/null | awk -v keys={q(joined)} "
        f"{q(awk)}",
        f"for k in {' '.join(q(k) for k in keys)}; do p=/proc/sys/$(printf %s \"$k\" | tr . /); "
        "[ -w \"$p\" ] && printf 'H\\tsysctl-now\\t%s\\t%s\\n' \"$k\" "
        "\"$(tr -s ' \\t' '  ' < \"$p\" | sed 's/ *$//')\"; done",
    ]


def query_for(plans: list[Plan]) -> Query:
    """What the check reads: the union of the plans' dependencies (one per release)."""
    files: list[str] = []
    dirs: list[str] = []
    guards: list[str] = []
    units: list[str] = []
    packages: list[str] = []
    users: list[str] = []

    def add(seq: list[str], item: str) -> None:
        if item not in seq:
            seq.append(item)

    for plan in plans:
        for s in plan.steps:
            if isinstance(s, File):
                add(files, s.file.path)
            elif type(s).__name__ == "Directory":
                add(dirs, s.dir.path)  # type: ignore[union-attr]
            elif isinstance(s, Run) and s.command.unless and not s.command.on_change:
                add(guards, s.command.unless)
            elif isinstance(s, UnitState):
                add(units, s.name)
            elif isinstance(s, Packages):
                for n in s.names:
                    add(packages, n)
            elif isinstance(s, User):
                add(users, s.name)
                add(files, f"/home/{s.name}/.ssh/authorized_keys")
    from selfhost.compile.removal import MANIFEST

    return Query(files=tuple(files), dirs=tuple(dirs), guards=tuple(guards), units=tuple(units),
                 packages=tuple(packages), users=tuple(users), manifest=MANIFEST, pending=True)


def health_script(plans: list[Plan], expected: dict[str, bytes],
                  backup_state: str = BACKUP_STATE) -> str:
    """Shell printing the release, the differing managed files' content and the health facts,
    one ``KIND<TAB>...`` line each (``backup_state``: where the backup glue records each
    repository's last success)."""
    q = shlex.quote
    parts = [
        ". /etc/os-release; printf 'R\\t%s\\n' \"$VERSION_CODENAME\"",
        "systemd-detect-virt -c -q 2>/dev/null && printf 'H\\tcontainer\\t1\\n'",
        "systemctl --failed --plain --no-legend --no-pager 2>/dev/null | "
        "awk '{print \"H\\tfailed\\t\" $1}'",
        "df --output=target,pcent,ipcent -x devtmpfs 2>/dev/null | tail -n +2 | "
        "awk '{gsub(\"%\",\"\"); print \"H\\tdisk\\t\" $1 \"\\t\" $2 \"\\t\" $3}'",
        "awk '/^MemTotal:/{t=$2} /^MemAvailable:/{a=$2} END{print \"H\\tmem\\t\" t \"\\t\" a}' "
        "/proc/meminfo",
        "[ -f /run/reboot-required ] && printf 'H\\treboot\\t1\\n'",
        "printf 'H\\tntp\\t%s\\n' \"$(timedatectl show -p NTPSynchronized --value 2>/dev/null)\"",
        "ss -H -tulpn 2>/dev/null | sed 's/^/L\\t/'",
        f"[ -f {REMOVED} ] && sed 's/^/Z\\t/' {REMOVED}",
    ]
    # The slow ones (apt's simulation, each service's probe with its own timeout) run side by
    # side; their lines are printed at the end.
    # The pending updates: the count APT's hook keeps while it is current, else apt's
    # simulation (seconds).
    slow = [f"printf 'H\\tupdates\\t%s\\n' \"$(if {FRESH_COUNT}; then cat {PENDING_CACHE}; "
            f"else {COUNT_SECURITY_UPDATES}; fi)\""]
    keys: list[str] = []
    for plan in plans:
        keys += [k for k in planned_sysctls(plan) if k not in keys]
    parts += _sysctl_script(keys)
    for path, content in sorted(expected.items()):
        sha1 = hashlib.sha1(content).hexdigest()
        parts.append(f"[ -f {q(path)} ] && [ \"$(sha1sum < {q(path)} | cut -c1-40)\" != {sha1} ] "
                     f"&& printf 'B\\t%s\\t%s\\n' {q(path)} \"$(head -c 262144 {q(path)} | "
                     "base64 -w0)\"")
    done: set[str] = set()
    for plan in plans:
        for h in plan.health:
            key = f"{h.kind}\t{h.target}"
            if key in done:
                continue
            done.add(key)
            if h.kind == "tcp":
                addr, _, port = h.target.rpartition(":")
                slow.append(f"if timeout 3 bash -c {q(f'</dev/tcp/{addr}/{port}')} 2>/dev/null; "
                            f"then printf 'K\\ttcp\\t%s\\t1\\n' {q(h.target)}; else "
                            f"printf 'K\\ttcp\\t%s\\t0\\n' {q(h.target)}; fi")
            elif h.kind == "https":
                name = h.target.split("/")[2]
                slow.append(f"printf 'K\\thttps\\t%s\\t%s\\n' {q(h.target)} \"$(curl -sk -o "
                             f"/dev/null -w '%{{http_code}}' --max-time 5 --resolve "
                             f"{q(name + ':443:127.0.0.1')} {q(h.target)} 2>/dev/null)\"")
            elif h.kind == "backup":
                # Seconds since the last success ("ok:N"), else since the backups were set
                # up ("none:N"), as the glue's hourly late check counts them.
                st = f"{backup_state}/{h.target}"
                parts.append(
                    f"n=$(date +%s); if [ -s {q(st + '.last-success')} ]; then "
                    f"r=ok:$((n - $(cat {q(st + '.last-success')}))); "
                    f"elif [ -s {q(st + '.since')} ]; then "
                    f"r=none:$((n - $(cat {q(st + '.since')}))); else r=unknown; fi; "
                    f"printf 'K\\tbackup\\t%s\\t%s\\n' {q(h.target)} \"$r\"")
            elif h.kind == "mailqueue":
                parts.append(f"printf 'K\\tmailqueue\\t%s\\t%s\\n' {q(h.target)} "
                             f"\"$({MAILQUEUE_OLD})\"")
            elif h.kind == "certificate":
                name = h.target
                slow.append(f"printf 'K\\tcertificate\\t%s\\t%s\\n' {q(name)} \"$(echo | "
                             f"timeout 5 openssl s_client -connect 127.0.0.1:443 -servername "
                             f"{q(name)} 2>/dev/null | openssl x509 -noout -checkend "
                             f"{int(h.expect or 1209600)} "
                             ">/dev/null 2>&1 && echo ok || echo expiring)\"")
    background = [f"( {p} ) > \"$w/{i:03d}\" 2>/dev/null &" for i, p in enumerate(slow)]
    return "\n".join(['w=$(mktemp -d)', *background, *(p + " || true" for p in parts),
                      'wait; cat "$w"/* 2>/dev/null; rm -rf "$w"'])


@dataclass
class Facts:
    release: str = ""
    in_container: bool = False
    failed: list[str] | None = None
    disks: list[tuple[str, int, int]] | None = None
    mem: tuple[int, int] = (0, 0)
    reboot: bool = False
    updates: int = 0
    ntp: str = ""
    sockets: str = ""
    contents: dict[str, bytes] | None = None
    checks: dict[tuple[str, str], str] | None = None
    removed: list[tuple[str, str, str]] | None = None
    """(service, when, data kept) of the services earlier deploys removed."""
    sysctl_boot: dict[str, tuple[str, str]] | None = None
    """Kernel setting -> (value at boot, the file that sets it last)."""
    sysctl_now: dict[str, str] | None = None
    """Kernel setting -> live value, for those the host can change."""


def parse_facts(lines: list[str]) -> Facts:
    f = Facts(failed=[], disks=[], contents={}, checks={}, removed=[], sysctl_boot={},
              sysctl_now={})
    ss: list[str] = []
    for line in lines:
        p = line.split("\t")
        if p[0] == "R" and len(p) > 1:
            f.release = p[1]
        elif p[0] == "L":
            ss.append("\t".join(p[1:]))
        elif p[0] == "B" and len(p) > 2:
            assert f.contents is not None
            f.contents[p[1]] = base64.b64decode(p[2] or "")
        elif p[0] == "Z" and len(p) > 3:
            assert f.removed is not None
            f.removed.append((p[1], p[2], p[3]))
        elif p[0] == "K" and len(p) > 3:
            assert f.checks is not None
            f.checks[(p[1], p[2])] = p[3]
        elif p[0] == "H" and len(p) > 2:
            k, v = p[1], p[2:]
            if k == "container":
                f.in_container = True
            elif k == "failed":
                assert f.failed is not None
                f.failed.append(v[0])
            elif k == "disk" and len(v) >= 3 and not SYSTEM_MOUNTS.match(v[0]):
                assert f.disks is not None
                f.disks.append((v[0], _int(v[1]), _int(v[2])))
            elif k == "mem" and len(v) >= 2:
                f.mem = (_int(v[0]), _int(v[1]))
            elif k == "reboot":
                f.reboot = True
            elif k == "updates":
                f.updates = _int(v[0])
            elif k == "ntp":
                f.ntp = v[0]
            elif k == "sysctl-boot" and len(v) >= 3:
                assert f.sysctl_boot is not None
                f.sysctl_boot[v[0]] = (v[1], v[2])
            elif k == "sysctl-now" and len(v) >= 2:
                assert f.sysctl_now is not None
                f.sysctl_now[v[0]] = v[1]
    f.sockets = "\n".join(ss)
    return f


def _int(s: str) -> int:
    return int(s) if s.strip().isdigit() else 0


def findings(plan: Plan, state: State, facts: Facts) -> list[Finding]:
    """Every finding, errors first. Pure."""
    out: list[Finding] = []
    expected = expected_files(plan)
    for step in plan.steps:
        if isinstance(step, Sync):
            continue
        if isinstance(step, File) and step.file.opaque:
            # A secret's content is not known here: only its presence and mode count.
            current = state.files.get(step.file.path)
            f = step.file
            if current is None:
                out.append(Finding("error", "drift", f"{f.path} is missing", "run the deploy"))
            elif (current.mode, current.owner, current.group) != (f.mode, f.owner, f.group):
                out.append(Finding("error", "drift", f"{f.path}: {current.owner}:{current.group} "
                                   f"{current.mode}, the model says {f.owner}:{f.group} {f.mode}",
                                   "run the deploy"))
            continue
        for change in step_changes(step, state):
            if change.kind == "run" and isinstance(step, Run) and not step.command.unless:
                continue  # a plain command: nothing to compare
            diff = ""
            if change.kind == "write-file" and isinstance(step, File):
                have = (facts.contents or {}).get(step.file.path)
                if have is not None:
                    diff = "".join(difflib.unified_diff(
                        have.decode("utf-8", "replace").splitlines(keepends=True),
                        expected[step.file.path].decode().splitlines(keepends=True),
                        f"{step.file.path} (on the server)", f"{step.file.path} (the model)"))
            out.append(Finding("error", "drift", change.describe(),
                               "run the deploy to put it back (or change the model)", diff))
    for path in sorted(state.staged):
        out.append(Finding("error", "drift", f"{path}.selfhost-new: a staged copy left by an "
                           "interrupted deploy", "run the deploy: it removes it"))
    for marker in sorted(state.pending):
        kind, _, what = marker.partition("-")
        out.append(Finding("error", "drift", f"an interrupted or rolled-back deploy left a "
                           f"{kind} undone ({what if kind == 'reload' else marker})",
                           "run the deploy: it does what was left"))
    out += _sysctl_findings(planned_sysctls(plan), facts)
    for unit in facts.failed or []:
        out.append(Finding("error", "health", f"unit {unit} has failed",
                           f"journalctl -u {unit}; systemctl restart {unit}"))
    for target, blocks, inodes in facts.disks or []:
        used = max(blocks, inodes)
        if used >= DISK_WARN:
            out.append(Finding("error" if used >= DISK_FAIL else "warning", "health",
                               f"{target} is {blocks}% full ({inodes}% of its inodes)",
                               "free space or grow the disk before it fills up"))
    total, avail = facts.mem
    if total and avail * 10 < total:
        out.append(Finding("warning", "health", f"less than 10% of memory available "
                           f"({avail // 1024} MiB of {total // 1024} MiB)",
                           "find what uses it: ps aux --sort=-rss | head"))
    if facts.reboot:
        out.append(Finding("warning", "health", "a reboot is pending (an update needs it)",
                           "reboot in a quiet moment (automatic reboots: hardening.updates)"))
    if facts.updates:
        out.append(Finding("warning", "health", f"{facts.updates} security update(s) pending",
                           "unattended-upgrades should install them: check its log"))
    if not facts.in_container and facts.ntp != "yes":
        out.append(Finding("warning", "health", "the clock is not synchronized (NTP)",
                           "timedatectl status; systemctl status systemd-timesyncd"))
    limits = {h.target: h.expect for h in plan.health if h.kind == "backup"}
    queues = {h.target: h.expect for h in plan.health if h.kind == "mailqueue"}
    for (kind, target), result in sorted((facts.checks or {}).items()):
        if kind == "backup":
            if target in limits:
                out += _backup_age(target, int(limits[target]), result)
            continue
        if kind == "mailqueue":
            limit = int(queues.get(target) or 0)
            if result.strip().isdigit() and int(result) > limit:
                out.append(Finding(
                    "warning", "health", f"{int(result)} message(s) have waited more than an "
                    f"hour in {target}'s queue (limit {limit})",
                    "postqueue -p shows them and why they wait; journalctl -u postfix"))
            continue
        bad = ((kind == "tcp" and result != "1")
               or (kind == "https" and not (result.isdigit() and 100 <= int(result) < 500))
               or (kind == "certificate" and result != "ok"))
        if bad:
            out.append(Finding("error", "health", f"{kind} check of {target} failed ({result})",
                               "see the service's journal"))
    for service, when, data in facts.removed or []:
        out.append(Finding("info", "drift", f"{service} was removed from the model ({when}); "
                           f"its data is kept: {data}",
                           "delete that data by hand once it is no longer needed"))
    allowed = {(p.port, p.proto) for p in plan.ports}
    for sock in parse_ss(facts.sockets):
        if not is_loopback(sock.address) and (sock.port, sock.proto) not in allowed:
            out.append(Finding("warning", "exposure",
                               f"{sock.describe()} listens, and the model does not explain it",
                               "stop that program, or add its service to the model"))
    return sorted(out, key=lambda f: SEVERITIES.index(f.severity))


def _sysctl_findings(want: dict[str, str], facts: Facts) -> list[Finding]:
    """Kernel settings another file overrides at boot, and settings changed at run time.

    A change of the model's own file is the file's drift, reported with it: not again here."""
    out = []
    boot, now = facts.sysctl_boot or {}, facts.sysctl_now or {}
    for key, value in sorted(want.items()):
        at_boot, source = boot.get(key, (value, SYSCTL_CONF))
        if at_boot != value and source != SYSCTL_CONF:
            out.append(Finding(
                "error", "drift", f"kernel setting {key} = {at_boot} at boot: {source} "
                f"overrides the model's {value}",
                f"remove {key} from {source}, or set hardening.kernel.sysctl_overrides in "
                "the model"))
        elif key in now and now[key] != value and at_boot == value:
            out.append(Finding(
                "error", "drift", f"kernel setting {key} is {now[key]} now, the model says "
                f"{value} (changed since boot, e.g. by sysctl -w)",
                "sudo sysctl --system applies the files again (a reboot does too)"))
    return out


def _backup_age(repo: str, limit_hours: int, result: str) -> list[Finding]:
    """A backup repository's last success against its ``max_age_hours`` (``result``: "ok:S"
    seconds since it, "none:S" no success in S seconds since the backups were set up,
    "unknown")."""
    kind, _, secs = result.partition(":")
    unit = f"selfhost-backup-{repo}.service"
    todo = (f"journalctl -u {unit} says why; back up now: systemctl start {unit} "
            f"(status: selfhost-backup status)")
    if kind not in ("ok", "none") or not secs.lstrip("-").isdigit():
        return [Finding("warning", "health", f"the last backup to repository {repo} is not "
                        f"known ({result or 'nothing read'})", todo)]
    hours = int(secs) // 3600
    if hours < limit_hours:
        return []
    what = (f"backup to repository {repo} is late: last success {hours} hours ago "
            f"(limit {limit_hours} h)" if kind == "ok" else
            f"backup to repository {repo} is late: no successful backup for {hours} hours "
            f"(limit {limit_hours} h)")
    return [Finding("error", "health", what, todo)]


def exit_code(found: list[Finding]) -> int:
    if any(f.severity == "error" for f in found):
        return EXIT_FAIL
    return EXIT_WARN if any(f.severity == "warning" for f in found) else EXIT_OK


def render(host: str, found: list[Finding]) -> str:
    if not [f for f in found if f.severity != "info"]:
        return "".join([f"{host}: all good (the server matches the model; no health problem)\n",
                        *(f"  INFO    {f.area:8} {f.what}\n" for f in found)])
    lines = [f"{host}: {sum(f.severity == 'error' for f in found)} error(s), "
             f"{sum(f.severity == 'warning' for f in found)} warning(s)"]
    for f in found:
        lines.append(f"  {f.severity.upper():7} {f.area:8} {f.what}")
        lines.append(f"  {'':7} {'':8} -> {f.todo}")
        if f.diff:
            lines += ["      " + d for d in f.diff.rstrip("\n").splitlines()]
    return "\n".join(lines) + "\n"


def to_json(host: str, found: list[Finding]) -> str:
    return json.dumps({"host": host, "exit": exit_code(found),
                       "findings": [asdict(f) for f in found]}, indent=2)


COMMON_PORTS = (21, 22, 23, 25, 53, 80, 110, 111, 139, 143, 443, 445, 465, 587, 631, 993,
                995, 2019, 3306, 5232, 5432, 6379, 8080, 8443, 9000)
"""Ports probed from outside besides the model's own: what a forgotten service would open."""


def probe_script(address: str, ports: list[int]) -> str:
    """Shell (bash) run on another machine: one ``O<TAB>port`` line per TCP port that answers."""
    q = shlex.quote
    return (f"for p in {' '.join(map(str, ports))}; do timeout 2 bash -c "
            f"\"</dev/tcp/{q(address)}/$p\" 2>/dev/null && printf 'O\\t%s\\n' $p; done; true")


def exposure(plan: Plan, address: str, lines: list[str]) -> list[Finding]:
    """Findings of a probe from outside: a port that answers but the model does not open is an
    error; a port the model opens to everyone that does not answer, a warning."""
    answering = {int(p[1]) for p in (line.split("\t") for line in lines)
                 if len(p) == 2 and p[0] == "O" and p[1].isdigit()}
    opened = {p.port for p in plan.ports if p.proto == "tcp"}
    public = {p.port for p in plan.ports if p.proto == "tcp" and p.zone == "internet"}
    out = [Finding("error", "exposure", f"{port}/tcp answers on {address} from outside, and "
                   "the model does not open it", "close it (firewall or the service)")
           for port in sorted(answering - opened)]
    out += [Finding("warning", "exposure", f"{port}/tcp does not answer on {address} from "
                    "outside, though the model opens it", "is its service running?")
            for port in sorted(public - answering)]
    return out


def check_host(fleet: Fleet, host: str, run: Callable[[str], list[str]]
               ) -> tuple[list[Finding], Plan]:
    """Check one host of the fleet through ``run`` (a script in, output lines out): one round
    trip. Returns the findings and the plan of the release the target runs."""
    from selfhost.compile import compile_fleet, prepare

    # Plans of each release, in and out of a container (kernel settings, AppArmor differ);
    # the fleet is routed and validated once for the four.
    prepared = prepare(fleet)
    by = {(r, c): compile_fleet(fleet, {host: Target(release=r, in_container=c)},
                                hosts=[host], prepared=prepared)[host]
          for r in RELEASES for c in (False, True)}
    all_plans = list(by.values())
    q = query_for(all_plans)
    expected: dict[str, bytes] = {}
    for p in all_plans:
        expected.update(expected_files(p))
    lines = run(script(q) + "\n" + health_script(all_plans, expected))
    facts = parse_facts(lines)
    if facts.release not in RELEASES:
        raise RuntimeError(f"the target runs {facts.release or 'an unknown system'!r}, not "
                           f"Debian {' or '.join(RELEASES)}")
    plan = by[(facts.release, facts.in_container)]
    # The differing files' content was read against every plan's expectation: keep those of
    # the right plan only.
    mine = expected_files(plan)
    facts.contents = {k: v for k, v in (facts.contents or {}).items() if k in mine}
    state = parse(q, lines)
    return findings(plan, state, facts), plan
