"""Hardening proof: Lynis before/after, ssh-audit policy, and the report's own checks.

For each Debian release (bookworm, trixie) this script:

1. starts a fresh systemd container ``hr-report-<release>`` from ``localhost/selfhost-debian``
   with SSH published on 127.0.0.1 only;
2. runs Lynis on the untouched container;
3. deploys ``examples/home.yaml`` twice with pyinfra (the second run must change nothing);
4. runs Lynis on the deployed container;
5. runs ssh-audit's built-in hardened policy for the release against the published port;
6. runs the report's own checks (one shell test per hardening control, via ``podman exec``).

Lynis comes from the host's Debian package (``apt-get install lynis``). It is copied into a
temporary directory inside the container and run from there (``--usecwd``, so it reads its
include/, db/, plugins/ and default.prf from that directory); logs and report go to the same
directory and are copied out, then the directory is removed. No package is installed in the
container and Debian's default profile is used unchanged: no test is skipped.

Results go to bench/results/hardening.json (and the raw Lynis logs and reports to
bench/results/hardening/). Run it through the wrapper: ``bench/hardening-report``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv" / "bin"
RESULTS = ROOT / "bench" / "results"
CONTAINERS_CONF = ROOT / "images" / "containers.conf"
EXAMPLE = ROOT / "examples" / "home.yaml"
IMAGE = "localhost/selfhost-debian:{release}"
LYNIS_TARGET = 90
POLICIES = {
    "bookworm": "Hardened Debian 12 (version 3)",
    "trixie": "Hardened Debian 13 (version 1)",
}
DEBIAN = {"bookworm": "12", "trixie": "13"}
LYNIS_DIR = "/run/selfhost-lynis"

# Lynis tests that cannot pass inside a podman container whatever the deploy does, and why.
CONTAINER_LIMITS = {
    "KRNL-6000": "/proc/sys is read-only in the container: selfhost's sysctl file is written "
                 "but the kernel keeps the host's values",
    "ACCT-9628": "auditd needs the kernel audit interface, which is not namespaced (the unit "
                 "is skipped in containers)",
    "ACCT-9622": "process accounting needs CAP_SYS_PACCT (acct is skipped in containers)",
    "FINT-4350": "Debian runs AIDE with CAP_DAC_READ_SEARCH, which the container lacks "
                 "(AIDE is left out in containers)",
    "FILE-6310": "separate /home and /var partitions are an installer decision, not a "
                 "deploy's",
    "MACF-6290": "no AppArmor/SELinux inside the container (the host kernel's LSM)",
    "TIME-3104": "time sync belongs to the host (selfhost installs systemd-timesyncd, which "
                 "does not run in a container)",
}

# The report's own checks: (control, what is verified, shell test run in the container).
CHECKS: list[tuple[str, str, str]] = [
    ("ssh", "sshd config valid, root login and passwords off",
     "sshd -t && sshd -T | grep -qx 'permitrootlogin no' && "
     "sshd -T | grep -qx 'passwordauthentication no'"),
    ("ssh", "only Ed25519 and RSA>=4096 host keys",
     "! ls /etc/ssh/ssh_host_ecdsa_key /etc/ssh/ssh_host_dsa_key 2>/dev/null && "
     "ssh-keygen -lf /etc/ssh/ssh_host_rsa_key.pub | awk '{exit !($1>=4096)}'"),
    ("ssh", "no Diffie-Hellman moduli under 3072 bits",
     "awk '$1 ~ /^[0-9]+$/ && $5 < 3071 {bad=1} END {exit bad}' /etc/ssh/moduli"),
    ("firewall", "nftables input policy drop, ssh rate-limited",
     "nft list chain inet selfhost input | grep -q 'policy drop' && "
     "nft list chain inet selfhost input | grep -q 'limit rate over'"),
    ("fail2ban", "sshd jail active",
     "fail2ban-client status sshd >/dev/null"),
    ("updates", "unattended-upgrades installed and its timers enabled",
     "dpkg-query -W -f='${Status}' unattended-upgrades | grep -q 'ok installed' && "
     "systemctl is-enabled apt-daily-upgrade.timer >/dev/null"),
    ("kernel", "hardened sysctl file and module blacklist present",
     "grep -q '^kernel.kptr_restrict = 2' /etc/sysctl.d/99-zz-selfhost-hardening.conf && "
     "grep -q '^blacklist dccp' /etc/modprobe.d/selfhost-blacklist.conf"),
    ("accounts", "umask 027, yescrypt, faillock and pwquality in PAM",
     "grep -qE '^UMASK\\s+027' /etc/login.defs && grep -qE '^ENCRYPT_METHOD\\s+YESCRYPT' "
     "/etc/login.defs && grep -q pam_faillock.so /etc/pam.d/common-auth && "
     "grep -q pam_pwquality.so /etc/pam.d/common-password"),
    ("accounts", "su restricted to the sudo group, no empty passwords",
     "grep -qE '^auth\\s+required\\s+pam_wheel.so group=sudo' /etc/pam.d/su && "
     "test -z \"$(awk -F: '$2 == \"\"' /etc/shadow)\""),
    ("minimal", "legacy/discovery software absent, dangerous units masked",
     "! dpkg-query -W -f='${Status}\\n' telnet rsh-client avahi-daemon rpcbind 2>/dev/null "
     "| grep -q 'ok installed' && "
     "test \"$(readlink /etc/systemd/system/ctrl-alt-del.target)\" = /dev/null"),
    ("audit", "auditd installed with selfhost's rules (running where the kernel allows)",
     "dpkg-query -W -f='${Status}' auditd | grep -q 'ok installed' && "
     "grep -q -- '-k identity' /etc/audit/rules.d/50-selfhost.rules && "
     "{ systemctl is-active -q auditd || systemd-detect-virt -cq; }"),
    ("audit", "process accounting and sysstat collecting",
     "dpkg-query -W -f='${Status}' acct | grep -q 'ok installed' && "
     "grep -qx 'ENABLED=\"true\"' /etc/default/sysstat && systemctl is-active -q sysstat"),
    ("audit", "debsums weekly, rkhunter daily with a baseline",
     "grep -qx 'CRON_CHECK=\"\\?weekly\"\\?' /etc/default/debsums && "
     "grep -qx 'CRON_DAILY_RUN=\"true\"' /etc/default/rkhunter && "
     "test -s /var/lib/rkhunter/db/rkhunter.dat && systemctl is-active -q cron"),
    ("audit", "AIDE baseline (or container: AIDE deliberately absent)",
     "test -s /var/lib/aide/aide.db || systemd-detect-virt -cq"),
    ("audit", "pam_tmpdir, legal banners, idle-shell timeout",
     "grep -q pam_tmpdir.so /etc/pam.d/common-session && grep -q 'Authorised access only' "
     "/etc/issue /etc/issue.net && grep -q 'readonly TMOUT' /etc/profile.d/50-selfhost-tmout.sh"),
    ("audit", "only root may use crontab; compilers root-only",
     "test \"$(cat /etc/cron.allow)\" = root && "
     "for b in as cc gcc; do p=$(command -v $b) || continue; "
     "test \"$(stat -Lc %a \"$p\")\" = 750 || exit 1; done"),
    ("system", "systemd reports no failed unit",
     "test -z \"$(systemctl list-units --failed --no-legend --plain)\""),
]


@dataclass
class Release:
    release: str
    container: str
    lynis_before: int | None = None
    lynis_after: int | None = None
    lynis_lost_after: dict[str, int] = field(default_factory=dict)
    lynis_projection: float | None = None
    lynis_warnings: list[str] = field(default_factory=list)
    lynis_suggestions: list[str] = field(default_factory=list)
    ssh_audit_policy: str = ""
    ssh_audit_passed: bool | None = None
    ssh_audit_errors: list[Any] = field(default_factory=list)
    deploy_changed: int | None = None
    redeploy_changed: int | None = None
    checks: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def shown(path: Path) -> Path:
    """``path`` relative to the repository when it is inside it."""
    path = path.resolve()
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def missing_auditors() -> str | None:
    """What to install first, or None when Lynis and ssh-audit are there."""
    if not Path("/usr/sbin/lynis").exists():
        return "Lynis is required on the host: apt-get install -y lynis"
    if not (VENV / "ssh-audit").exists():
        return "ssh-audit 3.x is required: .venv/bin/pip install ssh-audit"
    return None


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CONTAINERS_CONF=str(CONTAINERS_CONF))
    p = run(["podman", *args], env=env)
    if check and p.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])}...: {p.stderr.strip()}")
    return p


def sh(container: str, script: str) -> subprocess.CompletedProcess[str]:
    return podman("exec", container, "sh", "-c", script, check=False)


class Timer:
    def __init__(self, r: Release, name: str) -> None:
        self.r, self.name = r, name

    def __enter__(self) -> None:
        self.t = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        self.r.timings[self.name] = round(time.monotonic() - self.t, 1)


def start(r: Release) -> None:
    podman("rm", "-f", r.container, check=False)
    podman("run", "-d", "--name", r.container, "--hostname", "nas",
           "--cap-add", "NET_ADMIN", "--cap-add", "NET_RAW", "--systemd=always",
           "-p", "127.0.0.1::22", IMAGE.format(release=r.release), "/sbin/init")
    deadline, state = time.monotonic() + 90, ""
    while time.monotonic() < deadline:  # the bus may not answer in the first instants
        state = sh(r.container, "systemctl is-system-running --wait").stdout.strip()
        if state in ("running", "degraded"):
            return
        time.sleep(1)
    raise RuntimeError(f"{r.container}: systemd is {state!r}")


# Lynis from the host's Debian package, as (source, name in the run directory).
LYNIS_FILES = (("/usr/share/lynis/include", "include"), ("/usr/share/lynis/db", "db"),
               ("/etc/lynis/plugins", "plugins"), ("/usr/sbin/lynis", "lynis"),
               ("/etc/lynis/default.prf", "default.prf"))
LYNIS_ARGS = ("audit", "system", "--quick", "--no-colors", "--usecwd",
              "--logfile", f"{LYNIS_DIR}/lynis.log", "--report-file", f"{LYNIS_DIR}/report.dat")


def lynis_result(where: str, output: str, rc: int, out: Path,
                 label: str) -> tuple[int, str, str]:
    """(hardening index, report, log) of a Lynis run whose files were fetched into ``out``."""
    (out / f"lynis-{label}.txt").write_text(output)
    m = re.search(r"Hardening index : (\d+)", output)
    if not m:
        raise RuntimeError(f"{where}: no hardening index in Lynis output (rc {rc})")
    return (int(m.group(1)), (out / f"lynis-{label}.dat").read_text(errors="replace"),
            (out / f"lynis-{label}.log").read_text(errors="replace"))


def lynis(r: Release, label: str, out: Path) -> tuple[int, str, str]:
    """Run the host's Lynis inside the container from a temporary directory."""
    c = r.container
    out.mkdir(parents=True, exist_ok=True)
    sh(c, f"rm -rf {LYNIS_DIR} && mkdir -p {LYNIS_DIR}")
    for src, dst in LYNIS_FILES:
        podman("cp", src, f"{c}:{LYNIS_DIR}/{dst}")
    sh(c, f"chown -R root:root {LYNIS_DIR}")
    p = podman("exec", "-w", LYNIS_DIR, c, "./lynis", *LYNIS_ARGS, check=False)
    podman("cp", f"{c}:{LYNIS_DIR}/report.dat", str(out / f"lynis-{label}.dat"))
    podman("cp", f"{c}:{LYNIS_DIR}/lynis.log", str(out / f"lynis-{label}.log"))
    sh(c, f"rm -rf {LYNIS_DIR}")
    return lynis_result(c, p.stdout + p.stderr, p.returncode, out, label)


def lost_points(log: str) -> tuple[dict[str, int], int, int]:
    """Hardening points each Lynis test did not award, and the final (current, max)."""
    test, cur, mx = "", 0, 0
    lost: dict[str, int] = {}
    for line in log.splitlines():
        if m := re.search(r"Performing test ID (\S+)", line):
            test = m.group(1)
        if m := re.search(r"partial number of hardening points \((\d+) of (\d+)\)", line):
            a, b = int(m.group(1)), int(m.group(2))
            if a < b:
                lost[test] = lost.get(test, 0) + b - a
        if m := re.search(r"Currently having (\d+) points \(out of (\d+)\)", line):
            cur, mx = int(m.group(1)), int(m.group(2))
    return dict(sorted(lost.items(), key=lambda kv: (-kv[1], kv[0]))), cur, mx


def sysctl_recoverable(log: str) -> int:
    """KRNL-6000 points lost only because /proc/sys is read-only: keys where selfhost's
    sysctl file sets exactly the value Lynis expects."""
    sys.path.insert(0, str(ROOT))
    from selfhost.hardening.kernel import HARDENED_SYSCTL

    n = 0
    for m in re.finditer(r"sysctl key (\S+) has a different value than expected in scan "
                         r"profile\. Expected=(\S+), Real=", log):
        key, expected = m.group(1), m.group(2)
        if key == "net.ipv4.conf.all.forwarding":
            key = "net.ipv4.ip_forward"  # the same kernel setting
        if HARDENED_SYSCTL.get(key) == expected:
            n += 1
    return n


def deploy(r: Release, label: str, out: Path) -> int:
    """Deploy the example; return the changed count of pyinfra's 'Grand total' line."""
    script = ROOT / "deploys" / "home_server.py"
    p = run([str(VENV / "pyinfra"), "-y", f"@podman/{r.container}", str(script),
             "--data", f"selfhost_config={EXAMPLE}"], cwd=ROOT)
    log = p.stdout + p.stderr
    (out / f"deploy-{label}.log").write_text(log)
    if p.returncode != 0:
        raise RuntimeError(f"{label} deploy failed (rc {p.returncode}), see {out}")
    m = re.search(r"Grand total\s+\d+\s+(\d+|-)\s+", log)
    if not m:
        raise RuntimeError(f"{label} deploy: no 'Grand total' line")
    return 0 if m.group(1) == "-" else int(m.group(1))


def ssh_audit(r: Release) -> None:
    port = podman("port", r.container, "22/tcp").stdout.strip().rsplit(":", 1)[1]
    # A fresh container has banned nobody; this only clears state left by earlier probes so
    # that re-running the report cannot be blocked by the server's own fail2ban/rate limit.
    sh(r.container, "fail2ban-client unban --all; nft flush set inet selfhost ssh_meter4")
    run_ssh_audit(r, port)


def run_ssh_audit(r: Release, port: str) -> None:
    """ssh-audit's built-in hardened policy for the release, against 127.0.0.1:port."""
    r.ssh_audit_policy = POLICIES[r.release]
    # --skip-rate-test: ssh-audit's DHEat connection-rate probe opens ~40 connections; the
    # firewall's SSH rate limit and fail2ban then (rightly) cut it off mid-probe.
    p = run([str(VENV / "ssh-audit"), "--skip-rate-test", "-j", "-P", r.ssh_audit_policy,
             "-p", port, "127.0.0.1"])
    try:
        res = json.loads(p.stdout.strip().splitlines()[-1])
        r.ssh_audit_passed = bool(res.get("passed"))
        r.ssh_audit_errors = res.get("errors", [])
    except (ValueError, IndexError):
        r.ssh_audit_passed = False
        r.ssh_audit_errors = [(p.stdout + p.stderr).strip()[-500:]]


def checks(r: Release) -> None:
    for control, what, test in CHECKS:
        p = sh(r.container, f"( {test} ) >/dev/null 2>&1")
        r.checks.append({"control": control, "check": what, "passed": p.returncode == 0})


def one(release: str, keep: bool, out: Path) -> Release:
    r = Release(release=release, container=f"hr-report-{release}")
    try:
        with Timer(r, "start container"):
            start(r)
        with Timer(r, "lynis untouched"):
            r.lynis_before, _, _ = lynis(r, "before", out / release)
        with Timer(r, "deploy"):
            r.deploy_changed = deploy(r, "first", out / release)
        with Timer(r, "redeploy"):
            r.redeploy_changed = deploy(r, "second", out / release)
        with Timer(r, "ssh-audit"):
            ssh_audit(r)
        with Timer(r, "checks"):
            checks(r)
        with Timer(r, "lynis deployed"):
            r.lynis_after, dat, log = lynis(r, "after", out / release)
        r.lynis_warnings = re.findall(r"^warning\[\]=(.*)$", dat, re.M)
        r.lynis_suggestions = re.findall(r"^suggestion\[\]=(.*)$", dat, re.M)
        r.lynis_lost_after, cur, mx = lost_points(log)
        # Estimate for a VM/bare metal: the points this deploy would win there (sysctl
        # values applied, AIDE installed, auditd running), nothing else.
        if mx:
            won = (sysctl_recoverable(log) + r.lynis_lost_after.get("FINT-4350", 0)
                   + r.lynis_lost_after.get("ACCT-9628", 0))
            r.lynis_projection = round(100 * (cur + won) / mx, 1)
    except Exception as exc:  # reported in the table and the JSON
        r.errors.append(str(exc))
    finally:
        if not keep:
            podman("rm", "-f", r.container, check=False)
    return r


def table(results: list[Release], title: str = "",
          timings: tuple[str, ...] = ("start container", "lynis untouched", "deploy", "redeploy",
                                      "ssh-audit", "checks", "lynis deployed"),
          estimate: bool = True) -> str:
    rows = [(title, *(f"Debian {DEBIAN[r.release]} ({r.release})" for r in results))]

    def row(name: str, f: Any) -> None:
        rows.append((name, *(f(r) for r in results)))

    row("Lynis hardening index, untouched image", lambda r: str(r.lynis_before))
    row(f"Lynis hardening index, deployed example (target >= {LYNIS_TARGET})",
        lambda r: f"{r.lynis_after}" + ("" if r.lynis_after is None else
                                         " PASS" if r.lynis_after >= LYNIS_TARGET else
                                         " below target"))
    if estimate:
        row("  estimate on a VM (sysctl, AIDE, auditd)",
            lambda r: "-" if r.lynis_projection is None else f"~{r.lynis_projection:.0f}")
    row("ssh-audit policy", lambda r: r.ssh_audit_policy or "-")
    row("ssh-audit result", lambda r: {True: "PASS", False: "FAIL", None: "-"}[
        r.ssh_audit_passed])
    row("report checks passed (own checks, not molecule)",
        lambda r: f"{sum(c['passed'] for c in r.checks)}/{len(r.checks)}")
    row("idempotence: changed on 2nd deploy",
        lambda r: "-" if r.redeploy_changed is None else str(r.redeploy_changed))
    for t in timings:
        row(f"time: {t} (s)", lambda r, t=t: str(r.timings.get(t, "-")))
    widths = [max(len(str(x[i])) for x in rows) for i in range(len(rows[0]))]
    lines = []
    for i, x in enumerate(rows):
        lines.append("  ".join(str(v).ljust(w) for v, w in zip(x, widths, strict=True)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--release", action="append", choices=sorted(POLICIES),
                    help="release to test (repeatable; default: both)")
    ap.add_argument("--keep", action="store_true", help="keep the containers afterwards")
    ap.add_argument("--json", type=Path, default=None,
                    help="result file (default: bench/results/hardening.json, or "
                         "hardening-vm.json with --vm)")
    ap.add_argument("--vm", action="store_true",
                    help="measure qemu VMs (TCG, real kernel; images from images/build-vm) "
                         "instead of podman containers, one release after the other")
    args = ap.parse_args(argv)
    if args.vm:
        return main_vm(args)
    args.json = args.json or RESULTS / "hardening.json"
    if not shutil.which("podman"):
        print("podman is required", file=sys.stderr)
        return 2
    if (missing := missing_auditors()) is not None:
        print(missing, file=sys.stderr)
        return 2
    releases = args.release or ["bookworm", "trixie"]
    out = RESULTS / "hardening"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with ThreadPoolExecutor(len(releases)) as ex:
        results = list(ex.map(lambda rel: one(rel, args.keep, out), releases))
    total = round(time.monotonic() - t0, 1)

    print(table(results))
    print(f"\ntotal wall time: {total} s (releases in parallel)")
    for r in results:
        failed = [c["check"] for c in r.checks if not c["passed"]]
        for c in failed:
            print(f"{r.release}: check failed: {c}")
        for e in r.errors:
            print(f"{r.release}: ERROR: {e}")
        for e in r.ssh_audit_errors:
            print(f"{r.release}: ssh-audit: {e}")
        lost = ", ".join(f"{t} -{n}" for t, n in r.lynis_lost_after.items())
        print(f"{r.release}: Lynis points not awarded after deploy: {lost}")
    print("\nLynis tests that cannot pass in a container:")
    for t, why in CONTAINER_LIMITS.items():
        print(f"  {t}: {why}")

    doc = {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "lynis_target": LYNIS_TARGET,
        "wall_time_s": total,
        "checks_counted": "the report's own checks (CHECKS in bench/hardening_report.py), "
                          "run with podman exec; molecule's testinfra tests are not counted",
        "container_limits": CONTAINER_LIMITS,
        "releases": [asdict(r) for r in results],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=args.json.parent, delete=False) as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    Path(f.name).replace(args.json)
    print(f"\nJSON: {shown(args.json)}")
    ok = all(r.ssh_audit_passed and not r.errors and r.redeploy_changed == 0
             and all(c["passed"] for c in r.checks) for r in results)
    return 0 if ok else 1


# ---------------------------------------------------------------- VM path (--vm)
# The same measurement on a qemu VM (TCG) booted from images/build-vm's image through a fresh
# copy-on-write overlay (bench/vm.py): a real kernel, so nothing is excused as container-only.
# Everything goes over SSH on a port forwarded to 127.0.0.1: the first deploy as root (the
# image's key), then - root login being off after it - the admin alice (same key) with sudo.

VM_TIMINGS = ("build image", "boot to ssh", "lynis untouched", "deploy", "redeploy", "checks",
              "lynis deployed", "ssh-audit")
# Generous: on the shared 2-core machine at load 30, aide-common's postinst alone ran over 19 min
# of a first deploy under TCG (2026-11-30); an unloaded run's first deploy took 23 min.
VM_DEPLOY_TIMEOUT = 5400
VM_LYNIS_TIMEOUT = 3600


@dataclass
class VMRelease(Release):
    target: str = "qemu VM (TCG)"
    kernel: str = ""
    ssh_port: int | None = None
    lynis_lost_before: dict[str, int] = field(default_factory=dict)
    failed_units: list[str] = field(default_factory=list)


def _vm_module() -> Any:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import vm

    return vm


def vm_snapshot(tmp: Path) -> dict[str, Any]:
    """Copy selfhost/, deploys/ and examples/ to ``tmp`` and import them from there (as
    bench.py does): a VM run lasts close to an hour, and code committed meanwhile must not
    change the deploy between its first and second run."""
    global SNAPSHOT
    for d in ("selfhost", "deploys", "examples"):
        shutil.copytree(ROOT / d, tmp / d, ignore=shutil.ignore_patterns("__pycache__"))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(tmp), *filter(None, [os.environ.get("PYTHONPATH")])])
    SNAPSHOT = tmp
    where = run([str(VENV / "python"), "-c", "import selfhost; print(selfhost.__file__)"],
                cwd=tmp).stdout.strip()
    if not where.startswith(str(tmp)):
        raise RuntimeError(f"the code copy is not what gets imported: {where}")
    head = run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT).stdout.strip()
    dirty = run(["git", "status", "--porcelain", "selfhost", "deploys", "examples"],
                cwd=ROOT).stdout.count("\n")
    return {"git_head": head or None, "dirty_paths": dirty}


SNAPSHOT = ROOT


def vm_model(pubkey: str, tmp: Path) -> Path:
    """examples/home.yaml (from the snapshot) with alice's key replaced by ``pubkey``."""
    from example_model import with_admin_key

    return with_admin_key(SNAPSHOT / "examples" / "home.yaml", pubkey, tmp / "home-vm.yaml")


def vm_lynis(vm: Any, label: str, out: Path) -> tuple[int, str, str]:
    """Run the host's Lynis in the VM from a temporary directory (as :func:`lynis`)."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as stage:
        st = Path(stage)
        for src, dst in LYNIS_FILES:
            (shutil.copytree if Path(src).is_dir() else shutil.copy2)(src, st / dst)
        vm.sh(f"rm -rf {LYNIS_DIR}")
        vm.put_dir(st, LYNIS_DIR)
    vm.sh(f"chown -R root:root {LYNIS_DIR}")
    # sh ./lynis: on a real boot /run is mounted noexec (initramfs-tools does so).
    p = vm.sh(f"cd {LYNIS_DIR} && sh ./lynis {' '.join(LYNIS_ARGS)}", timeout=VM_LYNIS_TIMEOUT)
    vm.get_file(f"{LYNIS_DIR}/report.dat", out / f"lynis-{label}.dat")
    vm.get_file(f"{LYNIS_DIR}/lynis.log", out / f"lynis-{label}.log")
    vm.sh(f"rm -rf {LYNIS_DIR}")
    return lynis_result("VM", p.stdout + p.stderr, p.returncode, out, label)


def vm_deploy(vm: Any, label: str, out: Path, model: Path, sudo: bool) -> int:
    """Deploy the example over SSH as ``vm.user``; return the changed count (as :func:`deploy`)."""
    script = SNAPSHOT / "deploys" / "home_server.py"
    cmd = [str(VENV / "pyinfra"), "-y", "127.0.0.1", str(script),
           "--user", vm.user, "--key", str(vm.key), "--port", str(vm.port),
           *(["--sudo"] if sudo else []),
           "--data", f"ssh_known_hosts_file={vm.workdir / 'known_hosts-pyinfra'}",
           "--data", "ssh_strict_host_key_checking=accept-new",
           "--data", "ssh_allow_agent=false", "--data", "ssh_look_for_keys=false",
           "--data", f"selfhost_config={model}"]
    try:
        p = run(cmd, cwd=SNAPSHOT, timeout=VM_DEPLOY_TIMEOUT)
        log, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as exc:
        log = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                      for x in (exc.stdout, exc.stderr))
        rc = f"timeout after {VM_DEPLOY_TIMEOUT} s"
    (out / f"deploy-{label}.log").write_text(log)
    if rc != 0:
        raise RuntimeError(f"{label} deploy as {vm.user} failed (rc {rc}), see "
                           f"{shown(out / f'deploy-{label}.log')}")
    m = re.search(r"Grand total\s+\d+\s+(\d+|-)\s+", log)
    if not m:
        raise RuntimeError(f"{label} deploy: no 'Grand total' line")
    return 0 if m.group(1) == "-" else int(m.group(1))


def vm_diagnostics(vm: Any, r: VMRelease, out: Path) -> None:
    """Failed units and the boot's error journal, kept next to the logs."""
    p = vm.sh("systemctl list-units --failed --no-legend --plain")
    if p.returncode == 0:
        r.failed_units = [ln.split()[0] for ln in p.stdout.splitlines() if ln.strip()]
    p = vm.sh("systemctl --failed --no-pager; echo; journalctl -b -p err --no-pager | tail -200")
    (out / "diagnostics.txt").write_text(p.stdout + p.stderr)


def one_vm(release: str, out: Path) -> VMRelease:
    vmm = _vm_module()
    r = VMRelease(release=release, container=f"qemu-tcg:{release}")
    d = out / release
    d.mkdir(parents=True, exist_ok=True)
    try:
        with Timer(r, "build image"):
            vmm.build(release)
        with vmm.boot(release, keep_log=d / "serial.log") as vm:
            r.timings["boot to ssh"] = vm.boot_s
            r.ssh_port = vm.port
            r.kernel = vm.sh("uname -r").stdout.strip()
            with Timer(r, "lynis untouched"):
                r.lynis_before, _, log = vm_lynis(vm, "before", d)
            r.lynis_lost_before = lost_points(log)[0]
            with tempfile.TemporaryDirectory() as tmp:
                model = vm_model(vmm.KEY.with_suffix(".pub").read_text().strip(), Path(tmp))
                try:
                    with Timer(r, "deploy"):
                        r.deploy_changed = vm_deploy(vm, "first", d, model, sudo=False)
                    # Root login over SSH is off now: the admin (same key) with sudo.
                    vm.login("alice")
                    with Timer(r, "redeploy"):
                        r.redeploy_changed = vm_deploy(vm, "second", d, model, sudo=True)
                except Exception:
                    with contextlib.suppress(Exception):
                        vm_diagnostics(vm, r, d)
                    raise
            with Timer(r, "checks"):
                for control, what, test in CHECKS:
                    p = vm.sh(f"( {test} ) >/dev/null 2>&1")
                    r.checks.append({"control": control, "check": what,
                                     "passed": p.returncode == 0})
            vm_diagnostics(vm, r, d)
            with Timer(r, "lynis deployed"):
                r.lynis_after, dat, log = vm_lynis(vm, "after", d)
            r.lynis_warnings = re.findall(r"^warning\[\]=(.*)$", dat, re.M)
            r.lynis_suggestions = re.findall(r"^suggestion\[\]=(.*)$", dat, re.M)
            r.lynis_lost_after = lost_points(log)[0]
            # Last: ssh-audit's probes may look like an attack to fail2ban, which could then
            # ban the host side of the forwarded port (every later SSH command would fail).
            with Timer(r, "ssh-audit"):
                vm.sh("fail2ban-client unban --all; nft flush set inet selfhost ssh_meter4")
                run_ssh_audit(r, str(vm.port))
    except Exception as exc:  # reported in the table and the JSON
        r.errors.append(str(exc))
    return r


def main_vm(args: argparse.Namespace) -> int:
    # qemu and debootstrap: images/build-vm installs them when missing.
    if (missing := missing_auditors()) is not None:
        print(missing, file=sys.stderr)
        return 2
    if args.keep:
        print("--keep is ignored with --vm (each VM runs from a throwaway overlay)",
              file=sys.stderr)
    json_path = args.json or RESULTS / "hardening-vm.json"
    releases = args.release or ["bookworm", "trixie"]
    out = RESULTS / "hardening-vm"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    results: list[VMRelease] = []
    with tempfile.TemporaryDirectory(prefix="selfhost-hr-src-") as src:
        code = vm_snapshot(Path(src))
        for rel in releases:  # one VM at a time: TCG wants the cores
            results.append(one_vm(rel, out))
            # Each finished release is kept at once: a run stopped later keeps the ones done.
            write_vm_json(json_path, code, round(time.monotonic() - t0, 1), results)
    total = round(time.monotonic() - t0, 1)

    print(table(results, title="VM (qemu TCG)", timings=VM_TIMINGS, estimate=False))
    print(f"\ntotal wall time: {total} s (releases one after the other)")
    for r in results:
        for c in [c["check"] for c in r.checks if not c["passed"]]:
            print(f"{r.release}: check failed: {c}")
        for e in r.errors:
            print(f"{r.release}: ERROR: {e}")
        for e in r.ssh_audit_errors:
            print(f"{r.release}: ssh-audit: {e}")
        if r.failed_units:
            print(f"{r.release}: failed units: {', '.join(r.failed_units)}")
        lost = ", ".join(f"{t} -{n}" for t, n in r.lynis_lost_after.items())
        print(f"{r.release}: Lynis points not awarded after deploy: {lost}")

    write_vm_json(json_path, code, total, results)
    print(f"\nJSON: {shown(json_path)}")
    ok = all(r.ssh_audit_passed and not r.errors and r.redeploy_changed == 0
             and all(c["passed"] for c in r.checks) for r in results)
    return 0 if ok else 1


def write_vm_json(json_path: Path, code: dict[str, Any], total: float,
                  results: list[VMRelease]) -> None:
    doc = {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "target": "qemu-system-x86_64 -accel tcg -m 2048 -smp 2, images/build-vm image "
                  "through a fresh qcow2 overlay, SSH forwarded to 127.0.0.1",
        "code": code,
        "lynis_target": LYNIS_TARGET,
        "wall_time_s": total,
        "checks_counted": "the report's own checks (CHECKS in bench/hardening_report.py), "
                          "run over SSH with sudo; molecule's testinfra tests are not counted",
        "releases": [asdict(r) for r in results],
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=json_path.parent, delete=False) as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    Path(f.name).replace(json_path)


if __name__ == "__main__":
    sys.exit(main())
