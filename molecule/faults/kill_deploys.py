"""Killed deploys (issue 15), run by molecule/faults/converge.yml on the scenario's containers.

The controller (pyinfra, with every `podman exec` it started) is SIGKILLed:

1. after fixed delays on a blank host (5, 15 and 40 s: in the middle of the first package
   installation; each new deploy finds the orphaned apt still holding dpkg's lock), one kill
   after another, then the host is recovered;
2. at the start of every phase of the deploy (packages ... reloads), switching between model A
   and model B each time so that every phase has work to do;
3. after short fixed delays (1.5, 3 and 4.5 s) on a converged host (a switch of models
   takes about 4-7 s), switching models again.

Right after each kill, on every container: sshd is active, `sshd -t` accepts its
configuration, SSH answers on the port published on 127.0.0.1, and every managed file holds a
whole version (model A's, model B's, the image's, or its package's default that passes the
file's validator: never a half-written one). After each recovery deploy (which must succeed):
the running nftables ruleset and Caddy configuration are the model's, no `*.selfhost-new`
file is left, and one more deploy changes nothing.

Exit status 0 when every check passed; the log lists each kill with its timing.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

from selfhost.backend.pyinfra import PHASES  # noqa: E402
from selfhost.compile import Target, compile_server  # noqa: E402
from selfhost.compile.plan import File, User  # noqa: E402
from selfhost.config import load_server  # noqa: E402

HOSTS = [h for h in os.environ.get("SELFHOST_FAULT_HOSTS",
                                   "h15-faults-bookworm,h15-faults-trixie").split(",") if h]
PYINFRA = str(Path(sys.executable).parent / "pyinfra")
MODELS = {"A": HERE / "model-a.yaml", "B": HERE / "model-b.yaml"}
ANSI = re.compile(r"\x1b\[[0-9;]*m")
TOTAL = re.compile(r"Grand total\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)")
# Validators of the managed files that have one (run on the live file when its content is
# neither model's).
VALIDATE = {
    "/etc/ssh/sshd_config": "/usr/sbin/sshd -t -f {path}",
    "/etc/nftables.conf": "nft -c -f {path}",
    "/etc/caddy/Caddyfile": "caddy validate --adapter caddyfile --config {path} >/dev/null 2>&1",
}

failures: list[str] = []


def log(msg: str) -> None:
    print(msg, flush=True)


def fail(msg: str) -> None:
    failures.append(msg)
    log(f"  FAIL {msg}")


def sh(name: str, script: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", "exec", name, "sh", "-c", script], capture_output=True,
                          text=True, timeout=timeout, check=False)


def release_of(name: str) -> str:
    return sh(name, ". /etc/os-release; echo $VERSION_CODENAME").stdout.strip()


def expected_files(release: str) -> dict[str, dict[str, bytes]]:
    """Managed path -> {sha1: content} of its versions in model A and in model B."""
    out: dict[str, dict[str, bytes]] = {}
    for model in MODELS.values():
        plan = compile_server(load_server(model), Target(release=release, in_container=True))
        for step in plan.steps:
            content = None
            if isinstance(step, File) and step.file.secret is None:
                path, content = step.file.path, step.file.content.encode()
            elif isinstance(step, User):
                path = f"/home/{step.name}/.ssh/authorized_keys"
                content = "".join(k + "\n" for k in step.ssh_keys).encode()
            if content is not None:
                out.setdefault(path, {})[hashlib.sha1(content).hexdigest()] = content
    return out


def shas(name: str, paths: list[str]) -> dict[str, str]:
    script = "; ".join(
        f"if [ -f {p} ]; then printf '%s %s\\n' {p} \"$(sha1sum < {p} | cut -c1-40)\"; "
        f"else printf '%s -\\n' {p}; fi" for p in paths)
    out = sh(name, script).stdout.split("\n")
    return dict(line.split(" ", 1) for line in out if " " in line)


def published_ssh_port(name: str) -> int:
    out = subprocess.run(["podman", "port", name, "22/tcp"], capture_output=True, text=True,
                         check=True).stdout
    return int(out.strip().splitlines()[0].rsplit(":", 1)[1])


def ssh_answers(port: int) -> bool:
    done = subprocess.run(["ssh-keyscan", "-T", "5", "-t", "ed25519", "-p", str(port),
                           "127.0.0.1"], capture_output=True, text=True, timeout=30, check=False)
    return "ssh-ed25519" in done.stdout


def check_after_kill(label: str, ctx: dict[str, dict[str, object]]) -> None:
    for name, c in ctx.items():
        state = sh(name, "systemctl is-active ssh; /usr/sbin/sshd -t && echo sshd-t-ok").stdout
        if not state.startswith("active"):
            fail(f"{label} {name}: sshd is not active: {state.strip()}")
        if "sshd-t-ok" not in state:
            fail(f"{label} {name}: sshd -t refuses the live configuration")
        port = c["port"]
        assert isinstance(port, int)
        if not ssh_answers(port):
            fail(f"{label} {name}: SSH does not answer on 127.0.0.1:{port}")
        expected = c["expected"]
        initial = c["initial"]
        assert isinstance(expected, dict) and isinstance(initial, dict)
        live = shas(name, sorted(expected))
        for path, sha in live.items():
            if sha == "-" or sha in expected[path] or sha == initial.get(path):
                continue
            # Another version: the package's default (or what its postinst wrote), not yet
            # replaced. Fine if it is whole: not a strict prefix of a version of ours (what a
            # write cut short would leave), and accepted by the file's validator if any.
            live_bytes = subprocess.run(["podman", "exec", name, "cat", path],
                                        capture_output=True, timeout=60, check=False).stdout
            cut = [v for v in expected[path].values()
                   if len(live_bytes) < len(v) and v.startswith(live_bytes)]
            check = VALIDATE.get(path)
            valid = check is None or sh(name, check.format(path=path)).returncode == 0
            if cut or not valid:
                fail(f"{label} {name}: {path} is {'cut short' if cut else 'invalid'} "
                     f"({len(live_bytes)} bytes, sha1 {sha[:10]})")
            else:
                others = c.setdefault("others", set())
                assert isinstance(others, set)
                others.add(path)


def check_converged(label: str, model: str) -> None:
    for name in HOSTS:
        ruleset = sh(name, "nft list table inet selfhost 2>&1").stdout
        if ("dport 8080" in ruleset) != (model == "B"):
            fail(f"{label} {name}: the running firewall is not model {model}'s "
                 f"(port 8080 {'open' if 'dport 8080' in ruleset else 'closed'})")
        caddy = sh(name, "curl -s localhost:2019/config/").stdout
        if ("X-Model" in caddy) != (model == "B"):
            fail(f"{label} {name}: the running Caddy configuration is not model {model}'s")
        strays = sh(name, "find /etc /srv /home /usr/local /run -xdev -name '*.selfhost-new' "
                          "2>/dev/null").stdout.split()
        if strays:
            fail(f"{label} {name}: staged files left behind: {' '.join(strays)}")


def deploy(model: str, kill: tuple[str, object] | None = None) -> tuple[int, str, bool, float]:
    """Run pyinfra on every container; with ``kill``, SIGKILL it (and the `podman exec`
    clients it started) at that point. Returns (status, output, killed, seconds)."""
    env = {**os.environ, "SELFHOST_MOLECULE_HOSTS": ",".join(HOSTS),
           "SELFHOST_CONFIG": str(MODELS[model]), "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    proc = subprocess.Popen([PYINFRA, "-y", "inventories/molecule.py", "deploys/home_server.py"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    killed = threading.Event()

    def kill_now() -> None:
        if proc.poll() is None:
            killed.set()
            os.killpg(proc.pid, signal.SIGKILL)

    timer = None
    if kill is not None and kill[0] == "delay":
        timer = threading.Timer(float(kill[1]), kill_now)  # type: ignore[arg-type]
        timer.start()
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        # "--> Starting operation: selfhost home server | selfhost files"
        if kill is not None and kill[0] == "phase" and re.search(
                rf"Starting operation: .*\bselfhost {kill[1]}\s*$", ANSI.sub("", line)):
            kill_now()
    rc = proc.wait()
    if timer is not None:
        timer.cancel()
    return rc, ANSI.sub("", "".join(lines)), killed.is_set(), time.monotonic() - start


def changed_count(output: str) -> str:
    totals = TOTAL.findall(output)
    return totals[-1][1] if totals else "?"


def recover(label: str, model: str) -> None:
    rc, out, _, took = deploy(model)
    if rc != 0:
        fail(f"{label}: the next deploy (model {model}) failed, exit {rc}:\n{out[-4000:]}")
        return
    log(f"  next deploy converged in {took:.0f} s")
    check_converged(label, model)
    rc, out, _, took = deploy(model)
    changed = changed_count(out)
    if rc != 0 or changed not in ("-", "0"):
        fail(f"{label}: the deploy after it changed {changed} operations (exit {rc}):\n"
             f"{out[-3000:]}")
    else:
        log(f"  the one after changed nothing ({took:.0f} s)")


def killed_deploy(label: str, model: str, kill: tuple[str, object],
                  ctx: dict[str, dict[str, object]]) -> None:
    rc, out, killed, took = deploy(model, kill)
    how = f"killed after {took:.1f} s" if killed else f"ended by itself (exit {rc}) " \
                                                      f"after {took:.1f} s, not killed"
    log(f"{label}: model {model}, kill at {kill[0]} {kill[1]}: {how}")
    if not killed and rc != 0:
        fail(f"{label}: the deploy failed by itself:\n{out[-4000:]}")
    check_after_kill(label, ctx)


def main() -> int:
    t0 = time.monotonic()
    ctx: dict[str, dict[str, object]] = {}
    for name in HOSTS:
        expected = expected_files(release_of(name))
        ctx[name] = {"port": published_ssh_port(name), "expected": expected,
                     "initial": shas(name, sorted(expected))}
    kills = 0
    # 1. A blank host: kills in the middle of the first package installation.
    for delay in (5, 15, 40):
        kills += 1
        killed_deploy(f"kill {kills}", "A", ("delay", delay), ctx)
    recover(f"after kill {kills}", "A")
    # 2. Every phase boundary, switching models so that every phase has work to do.
    model = "A"
    for phase in PHASES:
        model = "B" if model == "A" else "A"
        kills += 1
        killed_deploy(f"kill {kills}", model, ("phase", phase), ctx)
        recover(f"after kill {kills}", model)
    # 3. Short fixed delays on a converged host.
    for delay in (1.5, 3, 4.5):
        model = "B" if model == "A" else "A"
        kills += 1
        killed_deploy(f"kill {kills}", model, ("delay", delay), ctx)
        recover(f"after kill {kills}", model)
    # Leave the hosts on model A for the verifier.
    if model != "A":
        recover("final", "A")
    for name, c in ctx.items():
        others = sorted(c.get("others", set()))  # type: ignore[call-overload]
        if others:
            log(f"{name}: seen with a package's own version (whole): {', '.join(others)}")
    log(f"{kills} kills on {len(HOSTS)} hosts in {time.monotonic() - t0:.0f} s; "
        f"{len(failures)} failed check(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
