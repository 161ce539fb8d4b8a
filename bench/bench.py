#!/usr/bin/env python3
"""selfhost benchmark: prints one table and saves the raw numbers to bench/results/latest.json.

    bench/run                 # full, about 25 min: 3 runs of figures 1, 2, 4; fleets of
                              # 1 (= figure 1's runs), 2, 4, 8 hosts with 1 run each
    bench/run --runs 5 --fleet-runs 3
    bench/run --quick         # about 8 min: 1 run, fleets of 1 and 4 hosts, no fleet floor
    bench/run --only 2,4      # some figures only
    bench/run --only 5 --noop-only  # figure 5 without its first converge against the floor

Figures (fresh bookworm containers from images/build, deploys with the real pyinfra CLI):

1. first converge of examples/home.yaml vs the floor: ``apt-get update && apt-get install`` of
   exactly the plan's package set, same flags, in a fresh container from the same image;
2. no-op re-deploy (same model), over ``@podman`` and over SSH (as alice, sudo) to a port
   published on 127.0.0.1: wall time split into phases, and the number of commands sent;
3. fleet: 1, 2, 4, 8 fresh hosts converged by one pyinfra run (default parallelism), and,
   for the largest fleet, the floor: as many bare apt installs at once;
4. validation + compile of generated models (N sites; N servers; one fleet file of N hosts
   loaded with ``load_fleet_text`` then ``compile_fleet``; one association server of N
   members): median time, peak memory.
5. the whole catalog (examples/catalog.yaml: every service but mail) on one
   host: first converge vs its apt floor, no-op re-deploys over @podman and SSH, check;
6. mail: 1,000 messages over authenticated SMTP into a Maildir (examples/mail.yaml) vs a bare
   postfix delivering the same messages with its defaults;
7. the association example (examples/association.yaml: three members, PHP-FPM pools, MariaDB)
   on one host: first converge vs its apt floor.

This is a measurement, never a test: nothing here fails the build. The machine has 2 cores and
is shared (other engineers run Molecule at the same time), apt downloads come from Debian's
mirrors over the network: expect noise of 10-30 % on the container figures. Load averages are
recorded next to each figure in the JSON.

Containers are named ``bench-<pid>-...`` (``--prefix X`` makes it ``X-<pid>-...``, for agents
sharing the machine) and removed at the end (also on Ctrl-C).
"""

from __future__ import annotations

import argparse
import atexit
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PY = str(ROOT / ".venv" / "bin" / "python")
IMAGE = "localhost/selfhost-debian:bookworm"
CONTAINERS_CONF = ROOT / "images" / "containers.conf"
APT_FLAGS = ("-y -qq --no-install-recommends -o Dpkg::Options::=--force-confdef "
             "-o Dpkg::Options::=--force-confold")
PREFIX = f"bench-{os.getpid()}"  # main() applies --prefix
CREATED: list[str] = []
TMP = Path(tempfile.mkdtemp(prefix="selfhost-bench-"))
atexit.register(lambda: shutil.rmtree(TMP, ignore_errors=True))  # also after --help, --report
REAL_PODMAN = shutil.which("podman") or "/usr/bin/podman"
# Others edit selfhost/ while the bench runs: every figure uses a copy taken at start-up
# (first on PYTHONPATH, ahead of the editable install), so all figures measure the same code.
SRC = TMP / "src"
EXAMPLE = SRC / "examples" / "home.yaml"


def snapshot_code() -> dict[str, Any]:
    import hashlib

    h = hashlib.sha256()
    for d in ("selfhost", "deploys", "examples"):
        shutil.copytree(ROOT / d, SRC / d, ignore=shutil.ignore_patterns("__pycache__"))
    for f in sorted(SRC.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(SRC)).encode() + b"\0" + f.read_bytes())
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "selfhost", "deploys", "examples"],
                           capture_output=True, text=True, cwd=ROOT).stdout.count("\n")
    where = subprocess.run([PY, "-c", "import selfhost; print(selfhost.__file__)"], cwd=SRC,
                           capture_output=True, text=True).stdout.strip()
    if not where.startswith(str(SRC)):
        raise RuntimeError(f"the code copy is not what gets imported: {where}")
    return {"git_head": git or None, "dirty_paths": dirty, "tree_sha256": h.hexdigest()[:16]}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(cmd: list[str], timeout: float = 900, check: bool = True,
       env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # From the code copy, so that `python -c` (cwd first on sys.path) imports it too.
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                       cwd=SRC if SRC.is_dir() else ROOT)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ---------------------------------------------------------------- containers

def start_containers(names: list[str], publish_ssh: bool = False, tun: bool = False) -> None:
    """Fresh bookworm systemd containers (``tun``: with /dev/net/tun, for a VPN in the
    model: wireguard-go runs in a container)."""
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    for name in names:
        cmd = [REAL_PODMAN, "run", "-d", "--name", name, "--hostname", "nas",
               "--cap-add", "NET_ADMIN", "--cap-add", "NET_RAW", "--systemd=always"]
        if publish_ssh:
            cmd += ["-p", "127.0.0.1::22"]
        if tun:
            cmd += ["--device=/dev/net/tun"]
        CREATED.append(name)
        sh([*cmd, IMAGE, "/sbin/init"], env=env, timeout=120)
    for name in names:
        # "degraded" is fine here: the point is that boot is over before we measure.
        sh(["timeout", "90", REAL_PODMAN, "exec", name, "systemctl", "is-system-running",
            "--wait"], check=False, timeout=120)


def remove_containers(names: list[str]) -> None:
    for name in names:
        if name.startswith(PREFIX + "-"):  # never anyone else's container
            sh([REAL_PODMAN, "rm", "-f", "-t", "0", name], check=False, timeout=120)
            if name in CREATED:
                CREATED.remove(name)


def container_cpu_s(name: str) -> float | None:
    """CPU seconds a container's cgroup has used so far (cgroup v1 cpuacct or v2 cpu.stat)."""
    p = subprocess.run([REAL_PODMAN, "inspect", "--format", "{{.State.CgroupPath}}", name],
                       capture_output=True, text=True,
                       env={**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)})
    path = p.stdout.strip()
    if p.returncode != 0 or not path:
        return None
    v1 = Path("/sys/fs/cgroup/cpuacct") / path.lstrip("/") / "cpuacct.usage"
    if v1.exists():
        return int(v1.read_text()) / 1e9
    v2 = Path("/sys/fs/cgroup") / path.lstrip("/") / "cpu.stat"
    if v2.exists():
        for line in v2.read_text().splitlines():
            if line.startswith("usage_usec "):
                return int(line.split()[1]) / 1e6
    return None


def cpu_used(names: list[str], before: dict[str, float | None]) -> dict[str, float] | None:
    """CPU seconds each container used since ``before`` (None when not measurable)."""
    out = {}
    for n in names:
        now, then = container_cpu_s(n), before.get(n)
        if now is None or then is None:
            return None
        out[n] = round(now - then, 2)
    return out


def cleanup() -> None:
    remove_containers(list(CREATED))
    shutil.rmtree(TMP, ignore_errors=True)


# ---------------------------------------------------------------- pyinfra runs

def podman_wrapper() -> Path:
    """A ``podman`` earlier in PATH that logs each invocation, then execs the real one."""
    bindir = TMP / "bin"
    bindir.mkdir(exist_ok=True)
    w = bindir / "podman"
    w.write_text(
        "#!/bin/sh\n"
        '[ -n "$BENCH_PODMAN_LOG" ] && printf \'%s %s\\n\' "$(date +%s.%N)" "$1" '
        '>> "$BENCH_PODMAN_LOG"\n'
        f'exec {REAL_PODMAN} "$@"\n'
    )
    w.chmod(0o755)
    return bindir


def pick_deploy() -> tuple[str, str]:
    """The deploy file every figure uses (from the code snapshot) and its label."""
    return str(SRC / "deploys" / "home_server.py"), "deploys/home_server.py"


_GRAND = re.compile(r"Grand total\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)")


def _num(s: str) -> int:
    return 0 if s == "-" else int(s)


def run_pyinfra(args: list[str], deploy: str, config: Path, tag: str,
                timeout: float = 1500, containers: list[str] | None = None) -> dict[str, Any]:
    """One pyinfra CLI run under bench/probe.py; returns timings, counts and the outcome
    (and, given the target ``containers``, the CPU seconds each one used)."""
    probe_log = TMP / f"probe-{tag}.json"
    podman_log = TMP / f"podman-{tag}.log"
    for f in (probe_log, podman_log):
        f.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{podman_wrapper()}:{os.environ['PATH']}",
           "BENCH_PROBE_LOG": str(probe_log), "BENCH_PODMAN_LOG": str(podman_log)}
    cmd = [PY, str(BENCH / "probe.py"), "-y", *args, deploy,
           "--data", f"selfhost_config={config}"]
    cpu0 = {n: container_cpu_s(n) for n in containers or []}
    la = loadavg()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=SRC)
    wall = time.perf_counter() - t0
    cpu = cpu_used(containers, cpu0) if containers else None
    m = ([None, *_GRAND.finditer(p.stderr)])[-1]  # the last "Grand total" line
    res: dict[str, Any] = {"wall_s": wall, "rc": p.returncode, "loadavg_before": la}
    if cpu is not None:
        res["target_cpu_s"] = cpu
    if m:
        res.update(ops=_num(m[1]), changed=_num(m[2]), errors=_num(m[3]), unchanged=_num(m[4]))
    if p.returncode != 0 or not m:
        res["stderr_tail"] = p.stderr[-4000:]
        log(f"pyinfra run {tag} failed (rc {p.returncode}):\n{p.stderr[-2500:]}")
    if podman_log.exists():
        calls = [ln.split()[1] if len(ln.split()) > 1 else "?"
                 for ln in podman_log.read_text().splitlines()]
        res["podman_calls"] = len(calls)
        res["podman_calls_by_subcommand"] = {c: calls.count(c) for c in sorted(set(calls))}
    if probe_log.exists():
        res.update(summarise_probe(json.loads(probe_log.read_text()), wall))
    return res


def summarise_probe(pr: dict[str, Any], wall: float) -> dict[str, Any]:
    phases: dict[str, float] = {}
    first = {}
    for ph in pr["phases"]:
        phases[ph["phase"]] = phases.get(ph["phase"], 0.0) + ph["end"] - ph["start"]
        first.setdefault(ph["phase"], ph["start"])
    cmds = pr["commands"]
    fact_cmds = [c for c in cmds if c["fact"]]
    op_cmds = [c for c in cmds if not c["fact"]]
    # Outside the probe: interpreter start-up before probe.py ran, and exit after it.
    out: dict[str, Any] = {
        "phases_s": {
            "python_imports": pr["imported"],
            "cli_and_inventory": first.get("connect", pr["end"]) - pr["imported"],
            **phases,
            "unaccounted": wall - sum(phases.values()) - first.get("connect", pr["end"]),
        },
        "commands": len(cmds),
        "fact_commands": len(fact_cmds),
        "op_commands": len(op_cmds),
        "fact_time_s": sum(f["end"] - f["start"] for f in pr["facts"]),
        "fact_command_time_s": sum(c["end"] - c["start"] for c in fact_cmds),
        "op_command_time_s": sum(c["end"] - c["start"] for c in op_cmds),
        "facts": [f["fact"] for f in pr["facts"]],
    }
    if any("cmd" in c for c in cmds):
        out["slowest_commands"] = sorted(
            ({"host": c["host"], "s": round(c["end"] - c["start"], 2), "cmd": c.get("cmd", "")}
             for c in cmds), key=lambda c: -c["s"])[:8]
    steps = []
    for st in pr.get("op_steps", []):
        hs = [h["end"] - h["start"] for h in pr.get("host_ops", [])
              if h["op"] == st["op"] and st["start"] <= h["start"] <= st["end"]]
        sent = sum(1 for c in op_cmds if st["start"] <= c["start"] <= st["end"])
        steps.append({"op": st["op"].removeprefix("selfhost home server | "), "commands": sent,
                      "s": round(st["end"] - st["start"], 3),
                      "host_max_s": round(max(hs), 3) if hs else None,
                      "host_mean_s": round(sum(hs) / len(hs), 3) if hs else None})
    out["op_steps"] = steps
    out["op_steps_total_s"] = sum(x["s"] for x in steps)
    out["ops_that_sent_commands"] = [x["op"] for x in steps if x["commands"]]
    # The packages phase runs selfhost/backend/apt-install.sh (its text starts the command).
    apt = [c for c in cmds if "apt-get install" in c.get("cmd", "")
           or "selfhost: install Debian packages" in c.get("cmd", "")]
    if apt:
        out["apt_command_s"] = {c["host"]: c["end"] - c["start"] for c in apt}
    return out


# ---------------------------------------------------------------- figure 1

def inventory(names: list[str]) -> Path:
    """A pyinfra inventory file of @podman hosts, each deploying examples/home.yaml."""
    inv = TMP / f"inventory-{len(names)}.py"
    inv.write_text("hosts = [\n" + "".join(
        f"    ({f'@podman/{h}'!r}, {{'selfhost_config': {str(EXAMPLE)!r}}}),\n"
        for h in names) + "]\n")
    return inv


def package_set(config: Path) -> list[str]:
    code = (
        "import json, sys\nfrom pathlib import Path\nfrom ruamel.yaml import YAML\n"
        "from selfhost.models import Server\n"
        "from selfhost.compile import compile_server, Target\n"
        "from selfhost.compile.plan import Packages\n"
        f"p = Path({str(config)!r})\n"
        "s = Server.model_validate(YAML(typ='safe').load(p.read_text()))"
        ".with_base_dir(p.parent.resolve())\n"
        "plan = compile_server(s, Target(release='bookworm', in_container=True))\n"
        "from selfhost.compile.plan import Run\n"
        "pkgs = [n for st in plan.steps if isinstance(st, Packages) for n in st.names]\n"
        # The converge installs systemd-timesyncd in a guarded step of its own (it conflicts
        # with other time daemons): it belongs to the same package set.
        "if any(isinstance(st, Run) and st.command.name.startswith('time sync') "
        "for st in plan.steps):\n"
        "    pkgs.append('systemd-timesyncd')\n"
        "print(json.dumps(pkgs))\n"
    )
    return json.loads(sh([PY, "-c", code]).stdout)


def floor_install(name: str, pkgs: list[str]) -> dict[str, Any]:
    script = ("export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install "
              f"{APT_FLAGS} {' '.join(pkgs)} >/dev/null")
    cpu0 = {name: container_cpu_s(name)}
    la = loadavg()
    t0 = time.perf_counter()
    p = sh([REAL_PODMAN, "exec", name, "sh", "-c", script], check=False, timeout=1500)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        log(f"floor install failed: {p.stderr[-1500:]}")
    res: dict[str, Any] = {"wall_s": wall, "rc": p.returncode, "loadavg_before": la}
    cpu = cpu_used([name], cpu0)
    if cpu is not None:
        res["target_cpu_s"] = cpu[name]
    return res


def floor_one(pkgs: list[str]) -> dict[str, Any]:
    name = f"{PREFIX}-f3floor-1"
    start_containers([name])
    try:
        return floor_install(name, pkgs)
    finally:
        remove_containers([name])


def figure1(runs: int, deploy: str) -> dict[str, Any]:
    return converge_vs_floor(EXAMPLE, runs, deploy, "f1")


def converge_vs_floor(model: Path, runs: int, deploy: str, tag: str,
                      tun: bool = False) -> dict[str, Any]:
    """First converges of ``model`` against apt installs of its package set, in pairs of
    fresh containers."""
    pkgs = package_set(model)
    log(f"figure {tag[1:]}: {runs} x (converge + floor) of {model.name}, packages: "
        f"{' '.join(pkgs)}")
    deploys, floors = [], []
    for r in range(runs):
        a, b = f"{PREFIX}-{tag}-deploy-{r}", f"{PREFIX}-{tag}-floor-{r}"
        start_containers([a, b], tun=tun)
        try:
            # Alternate the order so that slow drift (mirror, load) hits both sides alike.
            order = ["deploy", "floor"] if r % 2 == 0 else ["floor", "deploy"]
            for what in order:
                if what == "deploy":
                    d = run_pyinfra([str(inventory([a]))], deploy, model, f"{tag}-{r}",
                                    containers=[a])
                    d["hosts"] = 1
                    deploys.append(d)
                    log(f"  run {r}: converge {d['wall_s']:.1f} s "
                        f"(changed {d.get('changed')}, errors {d.get('errors')})")
                else:
                    f = floor_install(b, pkgs)
                    floors.append(f)
                    log(f"  run {r}: floor {f['wall_s']:.1f} s")
        finally:
            remove_containers([a, b])
    ok = [d for d in deploys if d["rc"] == 0]
    dm = median([d["wall_s"] for d in ok])
    fm = median([f["wall_s"] for f in floors if f["rc"] == 0])
    return {"packages": pkgs, "deploy_runs": deploys, "floor_runs": floors,
            "deploy_median_s": dm, "floor_median_s": fm, "ratio": dm / fm,
            "deploy_failures": len(deploys) - len(ok),
            "apt_in_deploy_median_s": median(
                [sum(d.get("apt_command_s", {}).values()) for d in ok])}


# ---------------------------------------------------------------- figure 2

CALENDARS = SRC / "examples" / "calendars.yaml"
# Test-only secrets for examples/calendars.yaml (it takes its passwords from the environment);
# fixed for the whole bench, so a re-deploy sees the same model. Set in this process, they
# reach every pyinfra run it starts.
BENCH_SECRETS = {
    "DAV_ALICE_PASSWORD": "bench only: Alice's calendar password, 2026!",
    "DAV_BOB_PASSWORD": "bench only: Bob's address book password, 2026!",
    "SELFHOST_BACKUP_USB_PASSWORD": "bench-only-usb-password",
    "NAS_CAROL_PASSWORD": "bench only: Carol's share password, 2026!",
    "XMPP_ALICE_PASSWORD": "bench only: Alice's chat password, 2026!",
}
CATALOG = SRC / "examples" / "catalog.yaml"
ASSOCIATION = SRC / "examples" / "association.yaml"
ASSOCIATION_SECRETS = {
    "ASSO_ALPHA_DB_PASSWORD": "bench only: alpha's database password, 2026!",
    "ASSO_BRAVO_DB_PASSWORD": "bench only: bravo's database password, 2026!",
    "ASSO_ALPHA_PASSWORD": "bench only: alpha's login, 2026!",
    "ASSO_BRAVO_PASSWORD": "bench only: bravo's login, 2026!",
    "ASSO_CHARLIE_PASSWORD": "bench only: charlie's login, 2026!",
    "ASSO_ANNA_MAIL_PASSWORD": "bench only: anna's mailbox, 2026!",
    "ASSO_BRUNO_MAIL_PASSWORD": "bench only: bruno's mailbox, 2026!",
}


def ssh_model(example: Path, pubkey: str) -> Path:
    """A copy of ``example`` whose alice key is ours, with absolute site sources."""
    from example_model import with_admin_key

    return with_admin_key(example, pubkey, TMP / f"{example.stem}-bench.yaml")


def figure2(runs: int, deploy: str) -> dict[str, Any]:
    """No-op re-deploys of examples/home.yaml (top-level keys) and of examples/calendars.yaml
    (under ``calendars``), each in its own container."""
    key = TMP / "id_ed25519"
    sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "selfhost-bench", "-f", str(key)])
    pub = (TMP / "id_ed25519.pub").read_text().strip()
    for k, v in BENCH_SECRETS.items():
        os.environ.setdefault(k, v)
    out = noop_redeploys(ssh_model(EXAMPLE, pub), key, runs, deploy, "f2")
    out["model"] = "examples/home.yaml with a generated key for alice"
    cal = noop_redeploys(ssh_model(CALENDARS, pub), key, runs, deploy, "f2cal")
    cal["model"] = ("examples/calendars.yaml with a generated key for alice, test-only "
                    "passwords from the environment")
    out["calendars"] = cal
    return out


def figure5(runs: int, deploy: str, noop_only: bool = False) -> dict[str, Any]:
    """The whole catalog on one host (examples/catalog.yaml: every service but mail): first converge vs its apt floor, then no-op re-deploys and checks."""
    key = TMP / "id_ed25519"
    if not key.exists():
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "selfhost-bench", "-f",
            str(key)])
    pub = (TMP / "id_ed25519.pub").read_text().strip()
    for k, v in BENCH_SECRETS.items():
        os.environ.setdefault(k, v)
    model = ssh_model(CATALOG, pub)
    out = {} if noop_only else converge_vs_floor(model, runs, deploy, "f5", tun=True)
    out["noop"] = noop_redeploys(model, key, runs, deploy, "f5noop", tun=True)
    out["model"] = ("examples/catalog.yaml with a generated key for alice, test-only passwords "
                    "from the environment")
    return out


# ---------------------------------------------------------------- figure 7

def figure7(runs: int, deploy: str) -> dict[str, Any]:
    """The association example (three members: two PHP sites with a database each, one
    static site): first converge vs its apt floor."""
    for k, v in {**BENCH_SECRETS, **ASSOCIATION_SECRETS}.items():
        os.environ.setdefault(k, v)
    out = converge_vs_floor(ASSOCIATION, runs, deploy, "f7")
    out["model"] = "examples/association.yaml, test-only passwords from the environment"
    return out


# ---------------------------------------------------------------- figure 6

MAIL = SRC / "examples" / "mail.yaml"
MAIL_SECRETS = {"MAIL_ALICE_PASSWORD": "bench only: Alice's mail password, 2026!",
                "MAIL_BOB_PASSWORD": "bench only: Bob's mail password, 2026!"}
MAIL_MESSAGES = 1000
# Runs in the target container (python3 of the image): one SMTP session sends N messages,
# then waits until N files are in the Maildir. Its parameters (the password among them)
# come on stdin, never in a command line.
MAIL_SCRIPT = r"""
import json, os, smtplib, ssl, sys, time
p = json.load(sys.stdin)
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
body = "x" * 900
def count():
    n = 0
    for d in ("new", "cur"):
        try:
            n += len(os.listdir(os.path.join(p["maildir"], d)))
        except FileNotFoundError:
            pass
    return n
before = count()
t0 = time.monotonic()
s = smtplib.SMTP("127.0.0.1", p["port"], timeout=60)
s.ehlo("bench.example")
if p["starttls"]:
    s.starttls(context=ctx)
    s.ehlo("bench.example")
if p["user"]:
    s.login(p["user"], p["password"])
for i in range(p["n"]):
    s.sendmail(p["from"], [p["to"]], f"From: {p['from']}\r\nTo: {p['to']}\r\n"
               f"Subject: bench {i}\r\nMessage-ID: <bench-{i}-{t0}@bench.example>\r\n\r\n"
               f"{body}\r\n")
s.quit()
submitted = time.monotonic() - t0
while count() - before < p["n"] and time.monotonic() - t0 < 900:
    time.sleep(0.1)
print(json.dumps({"submitted_s": submitted, "delivered_s": time.monotonic() - t0,
                  "delivered": count() - before}))
"""


def mail_run(name: str, params: dict[str, Any]) -> dict[str, Any]:
    la = loadavg()
    cpu0 = container_cpu_s(name)
    p = subprocess.run([REAL_PODMAN, "exec", "-i", name, "python3", "-c", MAIL_SCRIPT],
                       input=json.dumps(params), capture_output=True, text=True, timeout=1200)
    if p.returncode != 0:
        raise RuntimeError(f"mail bench in {name} failed:\n{p.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    cpu1 = container_cpu_s(name)
    out["target_cpu_s"] = None if cpu0 is None or cpu1 is None else round(cpu1 - cpu0, 2)
    out["loadavg_before"] = la
    return out


def figure6(runs: int, deploy: str) -> dict[str, Any]:
    """1,000 messages over authenticated SMTP (587, STARTTLS, login) into a Maildir on the
    converged examples/mail.yaml (Postfix, OpenDKIM signing, Dovecot over LMTP), against the
    floor: Debian's postfix installed with its defaults ("Local only") and only
    ``home_mailbox = Maildir/``, the same messages sent on port 25 without TLS or login,
    delivered by Postfix's own local(8)."""
    for k, v in {**BENCH_SECRETS, **MAIL_SECRETS}.items():
        os.environ.setdefault(k, v)
    a, b = f"{PREFIX}-f6-mail", f"{PREFIX}-f6-floor"
    log(f"figure 6: converge {a} with examples/mail.yaml, a bare postfix in {b}; "
        f"{runs} x {MAIL_MESSAGES} messages each")
    # The model's outbound limits (30 a minute per login by default) would defer the 31st
    # message: raised for the bench, the policy service still answers for each message.
    from ruamel.yaml import YAML

    data = YAML(typ="safe").load(MAIL.read_text())
    data["services"]["mail"]["outbound_limits"] = {"per_minute": 100_000,
                                                   "per_day": 10_000_000}
    model = TMP / "mail-bench.yaml"
    model.write_text(json.dumps(data, indent=1) + "\n")
    start_containers([a, b])
    out: dict[str, Any] = {"messages": MAIL_MESSAGES, "selfhost": [], "floor": [],
                           "model": "examples/mail.yaml, outbound limits raised to 100,000 a "
                                    "minute"}
    try:
        out["converge"] = run_pyinfra([f"@podman/{a}"], deploy, model, "f6-converge")
        if out["converge"]["rc"] != 0:
            raise RuntimeError("the mail converge failed")
        sh([REAL_PODMAN, "exec", b, "sh", "-c",
            "echo 'postfix postfix/main_mailer_type select Local only' | debconf-set-selections"
            " && echo 'postfix postfix/mailname string nas.home.arpa' | debconf-set-selections"
            f" && export DEBIAN_FRONTEND=noninteractive && apt-get update -qq && apt-get "
            f"install {APT_FLAGS} postfix >/dev/null && postconf -e home_mailbox=Maildir/ && "
            "useradd -m bench && systemctl restart postfix"], timeout=1200)
        mine = {"port": 587, "starttls": True, "user": "alice@home.arpa",
                "password": MAIL_SECRETS["MAIL_ALICE_PASSWORD"], "from": "alice@home.arpa",
                "to": "alice@home.arpa", "n": MAIL_MESSAGES,
                "maildir": "/var/vmail/home.arpa/alice/Maildir"}
        floor = {"port": 25, "starttls": False, "user": "", "password": "",
                 "from": "bench@nas.home.arpa", "to": "bench@localhost", "n": MAIL_MESSAGES,
                 "maildir": "/home/bench/Maildir"}
        for r in range(runs):
            for what, name, params in (("selfhost", a, mine), ("floor", b, floor)):
                since = sh([REAL_PODMAN, "exec", name, "date", "+%Y-%m-%d %H:%M:%S"]).stdout.strip()
                d = mail_run(name, params)
                # Deliveries deferred on the way (a retry waits 5 minutes): how many, and why.
                j = sh([REAL_PODMAN, "exec", name, "journalctl", "--since", since, "--no-pager",
                        "-o", "cat", "-t", "postfix/lmtp", "-t", "postfix/local",
                        "-t", "postfix/qmgr", "-t", "postfix/smtpd", "-t", "postfix/submission/smtpd",
                        "-t", "postfix/cleanup", "-t", "postfix/subcleanup"], check=False).stdout
                deferred = [ln for ln in j.splitlines() if "status=deferred" in ln
                            or "warning" in ln or "reject" in ln]
                d["deferred_or_warnings"] = len(deferred)
                d["sample"] = deferred[:3]
                out[what].append(d)
                log(f"  run {r}: {what}: {d['delivered']} delivered in {d['delivered_s']:.1f} s "
                    f"(submitted in {d['submitted_s']:.1f} s, target CPU {d['target_cpu_s']} s"
                    f"; deferred/warnings {d['deferred_or_warnings']}: {d['sample'][:1]})")
    finally:
        remove_containers([a, b])
    for what in ("selfhost", "floor"):
        ok = [d for d in out[what] if d["delivered"] >= MAIL_MESSAGES]
        out[f"{what}_median_s"] = median([d["delivered_s"] for d in ok])
        out[f"{what}_failures"] = len(out[what]) - len(ok)
    out["ratio"] = out["selfhost_median_s"] / out["floor_median_s"]
    return out


def noop_redeploys(model: Path, key: Path, runs: int, deploy: str, tag: str,
                   tun: bool = False) -> dict[str, Any]:
    name = f"{PREFIX}-{tag}"
    log(f"figure {tag[1]} ({model.name}): converge {name} over @podman, then {runs} no-op runs "
        "over @podman and SSH")
    start_containers([name], publish_ssh=True, tun=tun)
    out: dict[str, Any] = {}
    try:
        port = int(sh([REAL_PODMAN, "port", name, "22/tcp"]).stdout.strip().rsplit(":", 1)[1])
        out["ssh_port"] = port
        out["converge"] = run_pyinfra([f"@podman/{name}"], deploy, model, f"{tag}-converge")
        log(f"  converge {out['converge']['wall_s']:.1f} s")
        out["podman"] = []
        for r in range(runs):
            d = run_pyinfra([f"@podman/{name}"], deploy, model, f"{tag}-podman-{r}")
            out["podman"].append(d)
            log(f"  no-op @podman {r}: {d['wall_s']:.2f} s, changed {d.get('changed')}, "
                f"{d.get('commands')} commands, {d.get('podman_calls')} podman calls")
        ssh_args = [
            "127.0.0.1", "--user", "alice", "--key", str(key), "--port", str(port), "--sudo",
            "--data", f"ssh_known_hosts_file={TMP / f'known_hosts-{tag}'}",
            "--data", "ssh_strict_host_key_checking=accept-new",
            "--data", "ssh_allow_agent=false", "--data", "ssh_look_for_keys=false",
        ]
        # The first run over SSH can differ from the @podman plan: the deploy keeps "the SSH
        # port in use" open, and through a published port that is the HOST side port.
        first = run_pyinfra(ssh_args, deploy, model, f"{tag}-ssh-first")
        out["ssh_first"] = first
        log(f"  first run over SSH: {first['wall_s']:.2f} s, changed {first.get('changed')}")
        out["ssh"] = []
        for r in range(runs):
            d = run_pyinfra(ssh_args, deploy, model, f"{tag}-ssh-{r}")
            out["ssh"].append(d)
            log(f"  no-op SSH {r}: {d['wall_s']:.2f} s, changed {d.get('changed')}, "
                f"{d.get('commands')} commands")
        out["check"] = check_over_ssh(model, key, port, runs, tag)
    finally:
        remove_containers([name])
    for k in ("podman", "ssh"):
        ok = [d for d in out[k] if d["rc"] == 0]
        out[f"{k}_median_s"] = median([d["wall_s"] for d in ok])
        out[f"{k}_failures"] = len(out[k]) - len(ok)
        if ok:
            keys = ok[0]["phases_s"].keys()
            out[f"{k}_median_phases_s"] = {p: median([d["phases_s"].get(p, 0) for d in ok])
                                           for p in keys}
            out[f"{k}_median_fact_time_s"] = median([d["fact_time_s"] for d in ok])
            out[f"{k}_commands"] = sorted({d["commands"] for d in ok})
            out[f"{k}_changed"] = sorted({d.get("changed", -1) for d in ok})
    return out


def check_over_ssh(model: Path, key: Path, port: int, runs: int, tag: str) -> dict[str, Any]:
    """`selfhost check MODEL --ssh alice@127.0.0.1` on the converged host: wall time and the
    number of SSH sessions it opens (an ``ssh`` earlier in PATH logs each one and adds the
    bench's key and known-hosts file)."""
    bindir = TMP / "bin-ssh"
    bindir.mkdir(exist_ok=True)
    log_file = TMP / f"ssh-{tag}.log"
    real = shutil.which("ssh") or "/usr/bin/ssh"
    w = bindir / "ssh"
    w.write_text("#!/bin/sh\n"
                 f'echo "$*" >> {log_file}\n'
                 f'exec {real} -i {key} -o UserKnownHostsFile={TMP / f"known_hosts-{tag}"} '
                 "-o StrictHostKeyChecking=accept-new -o BatchMode=yes "
                 '-o IdentitiesOnly=yes "$@"\n')
    w.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    out: dict[str, Any] = {"runs": []}
    for r in range(runs + 1):  # the first one warms the caches (Python imports, sshd)
        log_file.unlink(missing_ok=True)
        t0 = time.monotonic()
        done = subprocess.run([PY, "-c", "import sys; from selfhost.cli import main; "
                               "sys.exit(main())", "check", str(model),
                               "--ssh", "alice@127.0.0.1", "--port", str(port), "--json"],
                              capture_output=True, text=True, env=env, timeout=300,
                              cwd=SRC, check=False)
        wall = time.monotonic() - t0
        sessions = len(log_file.read_text().splitlines()) if log_file.exists() else 0
        try:
            findings = json.loads(done.stdout)["findings"]
        except (ValueError, KeyError):
            findings = [{"severity": "error", "what": done.stderr.strip()[-300:]}]
        d = {"rc": done.returncode, "wall_s": round(wall, 3), "ssh_sessions": sessions,
             "errors": [f["what"] for f in findings if f["severity"] == "error"]}
        if r:
            out["runs"].append(d)
        log(f"  selfhost check over SSH {r}: {wall:.2f} s, exit {done.returncode}, "
            f"{sessions} ssh session(s)" + (" (warm-up)" if not r else ""))
    ok = [d for d in out["runs"] if d["rc"] in (0, 1)]
    out["median_s"] = median([d["wall_s"] for d in ok]) if ok else None
    out["sessions"] = sorted({d["ssh_sessions"] for d in out["runs"]})
    out["exit_codes"] = sorted({d["rc"] for d in out["runs"]})
    return out


# ---------------------------------------------------------------- figure 3

def fleet_floor(n: int, pkgs: list[str]) -> dict[str, Any]:
    """n bare apt-get installs at once, one per fresh container: what n hosts cost at least."""
    from concurrent.futures import ThreadPoolExecutor

    names = [f"{PREFIX}-f3floor-{n}-{i}" for i in range(n)]
    start_containers(names)
    try:
        la = loadavg()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as ex:
            each = list(ex.map(lambda c: floor_install(c, pkgs), names))
        wall = time.perf_counter() - t0
    finally:
        remove_containers(names)
    log(f"  floor: {n} bare apt installs at once: {wall:.1f} s")
    return {"hosts": n, "wall_s": wall, "loadavg_before": la, "each": each,
            "failures": sum(1 for e in each if e["rc"] != 0)}


def figure3(runs: int, sizes: list[int], deploy: str, fig1: dict[str, Any] | None,
            fleet_runs: int, with_floor: bool) -> dict[str, Any]:
    log(f"figure 3: fleets of {sizes} fresh hosts, {fleet_runs} run(s) each above 1 host"
        + (" (1 host: the converge runs of figure 1)" if fig1 and 1 in sizes else ""))
    res: dict[str, Any] = {str(n): [] for n in sizes}
    if fig1 and 1 in sizes:
        res["1"] = fig1["deploy_runs"]
    for r in range(max(runs, fleet_runs)):
        for n in sizes:
            if n == 1 and r >= runs:
                continue
            if n == 1 and fig1:
                continue
            if n > 1 and r >= fleet_runs:
                continue  # an 8-host converge takes 3-7 min here: 1 run each by default
            names = [f"{PREFIX}-f3-{n}-{r}-{i}" for i in range(n)]
            start_containers(names)
            try:
                d = run_pyinfra([str(inventory(names))], deploy, EXAMPLE, f"f3-{n}-{r}",
                                containers=names)
                d["hosts"] = n
                res[str(n)].append(d)
                apt = d.get("apt_command_s", {})
                log(f"  {n} host(s), run {r}: {d['wall_s']:.1f} s (changed {d.get('changed')}, "
                    f"errors {d.get('errors')}; apt per host "
                    f"{', '.join(f'{v:.0f}' for v in apt.values())} s)")
            finally:
                remove_containers(names)
    out: dict[str, Any] = {"runs": res}
    big = max(sizes)
    if big > 1 and with_floor:
        pkgs = fig1["packages"] if fig1 else package_set(EXAMPLE)
        ones = ([f for f in fig1["floor_runs"] if f["rc"] == 0] if fig1
                else [floor_one(pkgs)])
        many = fleet_floor(big, pkgs)
        out["floor"] = {"1": median([f["wall_s"] for f in ones]), str(big): many["wall_s"]}
        out["floor_cpu_per_host_s"] = {
            "1": median([f["target_cpu_s"] for f in ones if "target_cpu_s" in f]),
            str(big): median([e["target_cpu_s"] for e in many["each"] if "target_cpu_s" in e])}
    out["median_s"] = {k: median([d["wall_s"] for d in v if d["rc"] == 0])
                       for k, v in res.items()}
    out["median_apt_per_host_s"] = {
        k: median([median(list(d.get("apt_command_s", {}).values()) or [float("nan")])
                   for d in v if d["rc"] == 0]) for k, v in res.items()}
    # CPU seconds the targets used per host: with n hosts on c cores, no tool can converge
    # the fleet faster than n * cpu / c, whatever it does about round trips.
    out["median_cpu_per_host_s"] = {
        k: median([median(list(d["target_cpu_s"].values()))
                   for d in v if d["rc"] == 0 and d.get("target_cpu_s")])
        for k, v in res.items()}
    out["cpus"] = os.cpu_count()
    return out


# ---------------------------------------------------------------- figure 4

def figure4(runs: int, quick: bool) -> dict[str, Any]:
    log("figure 4: validation + compile of generated models")
    args = [PY, str(BENCH / "compile_bench.py"), "--runs", str(max(runs, 1)),
            "--sites", "10,100,200,1000", "--servers", "10,100,1000",
            "--fleet", "50,100,200,400", "--members", "3,50,200,400"]
    if quick:
        args += ["--mem-max-servers", "100"]
    p = sh(args, timeout=1500, env={**os.environ, "BENCH_SRC": str(SRC)})
    return json.loads(p.stdout)


# ---------------------------------------------------------------- table

def fmt_s(x: float) -> str:
    if x != x:  # nan
        return "n/a"
    return f"{x:.2f} s" if x < 10 else f"{x:.1f} s"


def verdict(ok: bool | None) -> str:
    return "info" if ok is None else "PASS" if ok else "FAIL"


def noop_rows(model: str, r: dict[str, Any], ssh_goal: float,
              max_commands: int | None) -> list[tuple[str, str, str, str]]:
    """Figure 2's rows for one model (``model``: a label prefix, "" for examples/home.yaml)."""
    rows: list[tuple[str, str, str, str]] = []
    for k, label, goal in (("podman", "@podman", None), ("ssh", "SSH (alice, sudo)", ssh_goal)):
        goal_text = "0 changed"
        if goal:
            goal_text = f"<= {goal:g} s, " + (f"<= {max_commands} commands, " if max_commands
                                              else "") + "0 changed"
        if f"{k}_median_phases_s" not in r:
            rows.append((f"2. no-op re-deploy, {model}{label}", "failed (see JSON)",
                         goal_text, "FAIL" if goal else "info"))
            continue
        ph = r[f"{k}_median_phases_s"]
        ok_runs = [d for d in r[k] if d["rc"] == 0]
        calls = ""
        if k == "podman":
            calls = f", {sorted({d.get('podman_calls') for d in ok_runs})} podman processes"
        startup = ph["python_imports"] + ph["cli_and_inventory"]
        measured = (
            f"{fmt_s(r[f'{k}_median_s'])} = start-up {startup:.2f} + connect "
            f"{ph.get('connect', 0):.2f} + prepare {ph.get('prepare', 0):.2f} (facts "
            f"{r[f'{k}_median_fact_time_s']:.2f}) + ops {ph.get('execute', 0):.2f} + exit "
            f"{ph.get('disconnect', 0) + ph['unaccounted']:.2f}; "
            f"{r[f'{k}_commands']} commands{calls}; changed {r[f'{k}_changed']}")
        idem = r[f"{k}_changed"] == [0]
        if not idem:
            measured += " (" + ", ".join(sorted(
                {o for d in ok_runs for o in d.get("ops_that_sent_commands", [])})) + ")"
        ok = idem
        if goal:
            ok = ok and r[f"{k}_median_s"] <= goal
        if goal and max_commands:
            ok = ok and max(r[f"{k}_commands"]) <= max_commands
        rows.append((f"2. no-op re-deploy, {model}{label}", measured, goal_text,
                     verdict(ok if goal else idem)))
    c = r.get("check")
    if c:
        ok = (c["median_s"] is not None and c["median_s"] <= 2.0 and c["sessions"] == [1]
              and set(c["exit_codes"]) <= {0, 1})
        rows.append((f"2. {model}`selfhost check` over SSH (alice, sudo), converged host",
                     (fmt_s(c["median_s"]) if c["median_s"] is not None else "failed")
                     + f" (runs {' / '.join(fmt_s(d['wall_s']) for d in c['runs'])}); "
                     f"{c['sessions']} SSH session(s) per check; exit {c['exit_codes']}",
                     "<= 2 s, 1 session, exit 0/1", verdict(ok)))
    if "ssh_first" in r:
        s = r["ssh_first"]
        rows.append((f"2. {model}first SSH run after @podman converge",
                     f"{fmt_s(s['wall_s'])}, changed {s.get('changed')}: "
                     + ", ".join(s.get("ops_that_sent_commands", [])),
                     "0 changed", verdict(s.get("changed") == 0)))
    return rows


def converge_row(label: str, r: dict[str, Any],
                 goal: float | None = 1.3) -> tuple[str, str, str, str]:
    """The row of a first converge against its apt floor (figures 1, 5 and 7; ``goal``: the
    ratio to stay under, None for a figure that is only reported)."""
    # Each round runs the converge and the floor back to back in two fresh containers:
    # the per-round ratio is less exposed to drift (mirror speed, others' load) than the
    # ratio of the medians, so the verdict takes the worse of the two.
    pairs = [d["wall_s"] / fl["wall_s"]
             for d, fl in zip(r["deploy_runs"], r["floor_runs"], strict=False)
             if d["rc"] == 0 and fl["rc"] == 0]
    paired = median(pairs)
    non_apt = median([d["wall_s"] - sum(d.get("apt_command_s", {}).values())
                      for d in r["deploy_runs"] if d["rc"] == 0])
    return (
        label,
        f"converge {fmt_s(r['deploy_median_s'])} / apt floor {fmt_s(r['floor_median_s'])}"
        f" = x{r['ratio']:.2f}; per round " + ", ".join(f"x{x:.2f}" for x in pairs)
        + f" (median x{paired:.2f}); converge minus its apt command: {fmt_s(non_apt)}"
        + (f"; {r['deploy_failures']} failed run(s)" if r["deploy_failures"] else ""),
        f"<= x{goal:g}" if goal else "-",
        verdict(None if goal is None else
                max(r["ratio"], paired) <= goal and not r["deploy_failures"]))


def table(res: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str, str]] = []
    f = res.get("figures", {})
    if "1" in f:
        rows.append(converge_row("1. first converge vs floor", f["1"]))
    if "2" in f:
        models: list[tuple[str, dict[str, Any], float, int | None]] = [("", f["2"], 10.0, None)]
        if "calendars" in f["2"]:
            models.append(("calendars.yaml ", f["2"]["calendars"], 2.0, 2))
        for mlabel, r, ssh_goal, max_cmds in models:
            rows += noop_rows(mlabel, r, ssh_goal, max_cmds)
    if "3" in f:
        r = f["3"]
        med = r["median_s"]
        for n, v in med.items():
            k = len([d for d in r["runs"][n] if d["rc"] == 0])
            cpu = r.get("median_cpu_per_host_s", {}).get(n)
            rows.append((f"3. fleet converge, {n} host(s)",
                         f"{fmt_s(v)} ({'median of ' if k > 1 else ''}{k} run{'s' * (k > 1)}; "
                         f"apt per host {fmt_s(r['median_apt_per_host_s'][n])}"
                         + (f"; target CPU per host {fmt_s(cpu)}" if cpu == cpu and cpu else "")
                         + ")", "-", "info"))
        big = max(med, key=int)
        if big != "1" and "1" in med:
            ratio = med[big] / med["1"]
            rows.append((f"3. fleet {big} hosts / 1 host", f"x{ratio:.2f}",
                         "<= x2" if big == "8" else "(goal is for 8)",
                         verdict(ratio <= 2) if big == "8" else "info"))
            fl = r.get("floor", {})
            if big in fl and "1" in fl:
                fcpu = r.get("floor_cpu_per_host_s", {})
                rows.append((f"3. floor: {big} bare apt installs at once / 1",
                             f"{fmt_s(fl[big])} / {fmt_s(fl['1'])} = x{fl[big] / fl['1']:.2f}"
                             " (1 run for the fleet)"
                             + (f"; target CPU per host {fmt_s(fcpu['1'])} alone, "
                                f"{fmt_s(fcpu[big])} in the fleet" if fcpu else ""),
                             "-", "info"))
            cpu1 = r.get("median_cpu_per_host_s", {}).get("1")
            cores = r.get("cpus")
            if cpu1 and cpu1 == cpu1 and cores:
                bound = int(big) * cpu1 / cores
                rows.append((f"3. CPU bound: {big} hosts x {fmt_s(cpu1)} CPU / {cores} cores",
                             f"{fmt_s(bound)} = x{bound / med['1']:.2f} the 1-host converge;"
                             f" the {big}-host run took x{med[big] / bound:.2f} this bound",
                             "-", "info"))
    if "4" in f:
        r = f["4"]
        for dim, label in (("sites", "sites in 1 server"), ("servers", "servers"),
                           ("fleet", "hosts in 1 fleet file"),
                           ("members", "members in 1 association server")):
            d = r.get(dim, {})
            for n, v in d.items():
                mem = (f"{v['peak_bytes'] / 1e6:.1f} MB" if v.get("peak_bytes") is not None
                       else "not measured")
                goal, ok = "-", None
                if dim == "sites" and n == "200":
                    goal, ok = "<= 1 s", v["median_s"] <= 1
                if dim == "fleet" and n == "200":
                    goal, ok = "<= 2 s", v["median_s"] <= 2
                if dim == "members" and n == "200":
                    goal, ok = "<= 1 s", v["median_s"] <= 1
                extra = ""
                if dim == "fleet":
                    extra = (f" (load+validate {fmt_s(v['load_median_s'])}; CPU "
                             f"{fmt_s(v['cpu_median_s'])}; {v['plan_steps']} plan steps)")
                rows.append((f"4. validate+compile, {n} {label}",
                             f"{fmt_s(v['median_s'])}, {v['per_item_s'] * 1e3:.2f} ms/item, "
                             f"peak {mem}{extra}", goal, verdict(ok)))
            ns = sorted(d, key=int)
            if dim == "fleet" and len(ns) >= 2:
                # Every step of the fleet sizes: wall time and (steadier) CPU time per host.
                steps_ = [(a, b, d[b]["per_item_s"] / d[a]["per_item_s"],
                           d[b]["cpu_median_s"] * int(a) / (d[a]["cpu_median_s"] * int(b)))
                          for a, b in itertools.pairwise(ns)]
                rows.append(("4. fleet: per-host time ratio",
                             "; ".join(f"{b}/{a} x{w:.2f} (CPU x{c:.2f})"
                                       for a, b, w, c in steps_),
                             "<= x1.5 (linear, on CPU time)",
                             verdict(all(c <= 1.5 for _, _, _, c in steps_))))
            elif len(ns) >= 2 and dim != "members":  # members: milliseconds, noise only
                a, b = ns[-2], ns[-1]
                growth = d[b]["per_item_s"] / d[a]["per_item_s"]
                rows.append((f"4. {dim}: per-item time {b} vs {a}", f"x{growth:.2f}",
                             "<= x1.5 (linear)", verdict(growth <= 1.5)))
    if "5" in f:
        if "deploy_runs" in f["5"]:
            rows.append(converge_row("5. catalog.yaml: first converge vs floor", f["5"]))
        rows += [(label.replace("2. ", "5. ", 1), *rest)
                 for label, *rest in noop_rows("catalog.yaml ", f["5"]["noop"], 2.0, None)]
    if "7" in f:
        rows.append(converge_row("7. association.yaml (3 members): first converge vs floor",
                                 f["7"], goal=None))
    if "6" in f:
        r = f["6"]
        n = r["messages"]
        rows.append((
            f"6. mail: {n} messages, authenticated SMTP to Maildir",
            f"{fmt_s(r['selfhost_median_s'])} ({n / r['selfhost_median_s']:.0f} msg/s; runs "
            + " / ".join(fmt_s(d["delivered_s"]) for d in r["selfhost"]) + ") vs floor "
            f"{fmt_s(r['floor_median_s'])} ({n / r['floor_median_s']:.0f} msg/s, bare postfix, "
            f"port 25, local(8)) = x{r['ratio']:.2f} for TLS, login, DKIM and LMTP"
            + (f"; {r['selfhost_failures']} failed run(s)" if r["selfhost_failures"] else ""),
            "-", "info"))
    w = [max(len(x[i]) for x in [("figure", "measured", "goal", "pass/fail"), *rows])
         for i in range(4)]
    line = "+".join("-" * (n + 2) for n in w)
    out = [" | ".join(h.ljust(w[i]) for i, h in
                      enumerate(("figure", "measured", "goal", "pass/fail"))), line]
    out += [" | ".join(c.ljust(w[i]) for i, c in enumerate(row)) for row in rows]
    return "\n".join(out)


# ---------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per figure (median; default 3)")
    ap.add_argument("--quick", action="store_true",
                    help="1 run, fleets of 1 and 4 hosts, no fleet floor (about 8 minutes)")
    ap.add_argument("--only", default="1,2,3,4,5,6,7", help="figures to run, e.g. 2,4")
    ap.add_argument("--fleet", default=None, help="fleet sizes (default 1,2,4,8)")
    ap.add_argument("--fleet-runs", type=int, default=1,
                    help="runs per fleet size above 1 host (default 1: an 8-host converge "
                    "takes 3-7 minutes on the shared 2-core machine; 1 host gets --runs)")
    ap.add_argument("--noop-only", action="store_true",
                    help="figure 5: only the no-op re-deploys and checks (no first converge "
                    "against the floor)")
    ap.add_argument("--prefix", default="bench",
                    help="container name prefix (names are PREFIX-<pid>-...; default bench)")
    ap.add_argument("--out", default=str(BENCH / "results" / "latest.json"))
    ap.add_argument("--report", metavar="JSON",
                    help="print the table of an earlier run's JSON, measure nothing")
    a = ap.parse_args()
    if a.report:
        res = json.loads(Path(a.report).read_text())
        print(table(res))
        print()
        footer(res, a.report)
        return 0
    global PREFIX
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", a.prefix):
        ap.error("--prefix: lowercase letters, digits and '-' only")
    PREFIX = f"{a.prefix}-{os.getpid()}"
    runs = 1 if a.quick else a.runs
    sizes = [int(x) for x in (a.fleet or ("1,4" if a.quick else "1,2,4,8")).split(",")]
    only = set(a.only.split(","))

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    t0 = time.perf_counter()
    res: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": runs, "quick": a.quick,
        "cpus": os.cpu_count(), "loadavg_start": loadavg(), "figures": {},
        "other_containers_running": [],
    }
    try:
        res["code"] = snapshot_code()
        if only & {"1", "2", "3", "5", "6", "7"}:
            log("images/build bookworm (cached) ...")
            sh([str(ROOT / "images" / "build"), "bookworm"], timeout=1800)
            deploy, deploy_note = pick_deploy()
            res["deploy_file"] = deploy_note
            res["image_id"] = sh([REAL_PODMAN, "image", "inspect", "--format", "{{.Id}}",
                                  IMAGE]).stdout.strip()[:12]
            res["other_containers_running"] = [
                n for n in sh([REAL_PODMAN, "ps", "--format", "{{.Names}}"]).stdout.split()
                if not n.startswith(PREFIX + "-")]
            log(f"deploy file: {deploy_note}")
        if "1" in only:
            res["figures"]["1"] = figure1(runs, deploy)
        if "2" in only:
            res["figures"]["2"] = figure2(runs, deploy)
        if "3" in only:
            res["figures"]["3"] = figure3(runs, sizes, deploy, res["figures"].get("1"),
                                          fleet_runs=1 if a.quick else a.fleet_runs,
                                          with_floor=not a.quick)
        if "4" in only:
            res["figures"]["4"] = figure4(runs, a.quick)
        if "5" in only:
            res["figures"]["5"] = figure5(runs, deploy, noop_only=a.noop_only)
        if "6" in only:
            res["figures"]["6"] = figure6(runs, deploy)
        if "7" in only:
            res["figures"]["7"] = figure7(runs, deploy)
    finally:
        cleanup()
        res["loadavg_end"] = loadavg()
        res["total_s"] = time.perf_counter() - t0
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(table(res))
    print()
    footer(res, a.out)
    return 0


def footer(res: dict[str, Any], out: str) -> None:
    print(f"runs per figure: {res['runs']} (median); load average start {res['loadavg_start']} end "
          f"{res['loadavg_end']} on {res['cpus']} CPUs; other containers running: "
          f"{', '.join(res['other_containers_running']) or 'none'}")
    if "deploy_file" in res:
        print(f"deploy file: {res['deploy_file']}")
    c = res.get("code", {})
    print(f"code: copy of selfhost/, deploys/, examples/ taken at start (git {c.get('git_head')}, "
          f"{c.get('dirty_paths')} uncommitted path(s), tree {c.get('tree_sha256')})")
    print("Timings are noisy: shared 2-core machine (Molecule runs alongside), apt downloads "
          "from Debian's mirrors. Raw numbers: " + str(Path(out).resolve().relative_to(ROOT)
                                                       if Path(out).resolve().is_relative_to(ROOT)
                                                       else out))
    print(f"total bench time {res['total_s'] / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(main())
