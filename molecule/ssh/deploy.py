"""Deploys of the `ssh` scenario, as a user runs them: the first one as root (podman exec),
every later one over SSH as the model's admin with sudo and the admin's password.

    python molecule/ssh/deploy.py prepare WORKDIR
    python molecule/ssh/deploy.py root WORKDIR CONTAINER
    python molecule/ssh/deploy.py ssh WORKDIR CONTAINER PORT

`prepare` writes (once) into WORKDIR: random secrets (0600), an SSH key for alice, and the
model: examples/home.yaml with that key, alice's password by reference, a backup repository
with a password and the mail relay of relay.sh (STARTTLS, AUTH) with a password (all three
`{env: ...}`).

`root` and `ssh` run pyinfra with the secrets in its environment only, and meanwhile sample
every process command line of this machine (the containers' processes included) for the
secrets. pyinfra's output goes through unchanged (stderr: Molecule's converge reads its
results table). A report per run lands in WORKDIR/reports/: changed operations, where a
secret was seen (in a command line or in pyinfra's output; which secret, never its value).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import string
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PYINFRA = Path(sys.executable).parent / "pyinfra"
ENV = {  # secret -> environment variable named in the model
    "admin_password": "SELFHOST_TEST_ADMIN_PASSWORD",
    "backup_password": "SELFHOST_TEST_BACKUP_PASSWORD",
    "smtp_password": "SELFHOST_TEST_SMTP_PASSWORD",
}
RELAY_IP = "10.216.16.2"  # molecule/ssh/relay.sh
ANSI = re.compile(r"\x1b\[[0-9;]*m")
TOTAL = re.compile(r"Grand total\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)")


def _password(avoid: tuple[str, ...]) -> str:
    alphabet = string.ascii_letters + string.digits + "-_.+"
    while True:
        pw = "".join(secrets.choice(alphabet) for _ in range(28))
        if not any(a in pw.lower() for a in avoid):
            return pw


def prepare(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    (work / "reports").mkdir(exist_ok=True)
    secret_file = work / "secrets.json"
    if not secret_file.exists():
        avoid = ("alice", "nas", "home", "arpa")
        data = {k: _password(avoid) for k in ENV}
        secret_file.touch(mode=0o600)
        secret_file.write_text(json.dumps(data))
    key = work / "id_ed25519"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "alice@molecule",
                        "-f", str(key)], check=True)
    from ruamel.yaml import YAML

    example = REPO / "examples" / "home.yaml"
    model = YAML(typ="safe").load(example.read_text())
    model["admins"] = [{
        "name": "alice",
        "ssh_keys": [(work / "id_ed25519.pub").read_text().strip()],
        "password": {"env": ENV["admin_password"]},
    }]
    for site in model["services"]["web"]["sites"]:
        if site.get("source"):
            site["source"] = str((example.parent / site["source"]).resolve())
    model["backup"] = {"repositories": [{
        "name": "local", "type": "local", "path": "/var/backups/restic-local",
        "password": {"env": ENV["backup_password"]},
    }]}
    # The relay container of molecule/ssh/relay.sh: submission, STARTTLS, AUTH.
    model["notify"] = {"email": "alice@example.org", "smtp": {
        "host": RELAY_IP, "port": 587, "tls": "starttls", "user": "nas@home.arpa",
        "password": {"env": ENV["smtp_password"]},
    }}
    # JSON is YAML: no line folding, no `off` turning into a boolean.
    (work / "model.yaml").write_text(json.dumps(model, indent=2) + "\n")


def _secrets(work: Path) -> dict[str, str]:
    data: dict[str, str] = json.loads((work / "secrets.json").read_text())
    return data


class Sampler(threading.Thread):
    """Reads every /proc/PID/cmdline of this machine until stopped; records which needle
    (by name) appeared in which process."""

    def __init__(self, needles: dict[str, str], interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.needles = {name: value.encode() for name, value in needles.items()}
        self.interval = interval
        self.stop = threading.Event()
        self.sweeps = 0
        self.hits: list[dict[str, Any]] = []

    def run(self) -> None:
        me = str(os.getpid())
        while not self.stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or pid == me:
                    continue
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmdline = f.read()
                except OSError:
                    continue
                for name, value in self.needles.items():
                    if value in cmdline:
                        shown = cmdline.replace(value, b"<" + name.encode() + b">")
                        self.hits.append({"secret": name, "pid": int(pid), "cmdline":
                                          shown.replace(b"\0", b" ").decode(errors="replace")})
            self.sweeps += 1
            time.sleep(self.interval)


def run(work: Path, mode: str, container: str, port: int | None) -> int:
    values = _secrets(work)
    env = {**os.environ, **{ENV[k]: v for k, v in values.items()}}
    model = str(work / "model.yaml")
    if mode == "root":
        argv = [str(PYINFRA), "-y", "-vv", f"@podman/{container}", "deploys/home_server.py",
                "--data", f"selfhost_config={model}"]
    else:
        env.update({"SELFHOST_SSH_PORT": str(port), "SELFHOST_SSH_KEY": str(work / "id_ed25519"),
                    "SELFHOST_SSH_KNOWN_HOSTS": str(work / f"known_hosts-{container}"),
                    "SELFHOST_SSH_MODEL": model,
                    "SELFHOST_SSH_SUDO_PASSWORD": values["admin_password"]})
        argv = [str(PYINFRA), "-y", "-vv", "molecule/ssh/inventory.py", "deploys/home_server.py"]

    # A canary proves the sampler sees short command lines of other processes.
    canary = secrets.token_hex(12)
    sampler = Sampler({**values, "canary": canary})
    sampler.start()
    subprocess.run(["sh", "-c", "sleep 0.3", canary], check=True)
    started = time.monotonic()
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1800, check=False)
    took = time.monotonic() - started
    sampler.stop.set()
    sampler.join()
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)

    output = done.stdout + done.stderr
    totals = TOTAL.findall(ANSI.sub("", output))
    changed = totals[-1][1] if totals else None
    report = {
        "mode": mode, "container": container, "rc": done.returncode, "seconds": round(took, 1),
        "changed": None if changed is None else (0 if changed == "-" else int(changed)),
        "sweeps": sampler.sweeps,
        "canary_seen": any(h["secret"] == "canary" for h in sampler.hits),
        "cmdline_hits": [h for h in sampler.hits if h["secret"] != "canary"],
        "output_hits": [name for name, value in values.items() if value in output],
        "output_chars": len(output),
    }
    reports = work / "reports"
    n = len(list(reports.glob(f"{container}-*.json")))
    (reports / f"{container}-{n:02d}-{mode}.json").write_text(json.dumps(report, indent=1))
    print(f"selfhost ssh scenario: {json.dumps(report)}", file=sys.stderr)
    return done.returncode


def main(argv: list[str]) -> int:
    cmd, work = argv[0], Path(argv[1])
    if cmd == "prepare":
        prepare(work)
        return 0
    if cmd == "root":
        return run(work, "root", argv[2], None)
    if cmd == "ssh":
        return run(work, "ssh", argv[2], int(argv[3]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
