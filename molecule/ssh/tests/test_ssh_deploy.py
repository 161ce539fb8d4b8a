"""Checks of the `ssh` scenario: the admin's password works for sudo, a re-deploy over SSH
changes nothing, and the model's three secrets never leak (command lines, pyinfra's output,
the journal, files a non-root user can read). See molecule/ssh/molecule.yml."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

WORK = Path(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", "/nonexistent")) / "ssh-scenario"
PASSWORD_FILES = {"backup_password": "/etc/selfhost/backup/local.password",
                  "smtp_password": "/etc/selfhost/smtp-password"}


@pytest.fixture(scope="module")
def values() -> dict[str, str]:
    data: dict[str, str] = json.loads((WORK / "secrets.json").read_text())
    assert set(data) == {"admin_password", "backup_password", "smtp_password"}
    return data


@pytest.fixture(scope="module")
def reports(host: Any) -> list[dict[str, Any]]:
    name = host.backend.name
    out = [json.loads(p.read_text()) for p in sorted((WORK / "reports").glob(f"{name}-*.json"))]
    # First deploy as root, then over SSH: one in converge, one for idempotence (at least).
    assert [r["mode"] for r in out][:1] == ["root"], out
    assert len([r for r in out if r["mode"] == "ssh"]) >= 2, out
    return out


def exec_in(name: str, argv: list[str], stdin: str = "",
            user: str | None = None) -> subprocess.CompletedProcess[str]:
    """A command in the container, with data on stdin (never in a command line)."""
    return subprocess.run(["podman", "exec", "-i", *(["--user", user] if user else []), name,
                           *argv], input=stdin, capture_output=True, text=True,
                          errors="replace", timeout=600, check=False)


def test_admin_sudo_needs_and_takes_her_password(host: Any, values: dict[str, str]) -> None:
    name = host.backend.name
    ok = exec_in(name, ["sudo", "-S", "-k", "-p", "", "id", "-u"],
                 values["admin_password"] + "\n", user="alice")
    assert ok.returncode == 0 and ok.stdout.strip() == "0", ok.stderr
    wrong = exec_in(name, ["sudo", "-S", "-k", "-p", "", "true"], "not-her-password\n",
                    user="alice")
    assert wrong.returncode != 0
    none = exec_in(name, ["sudo", "-n", "true"], user="alice")
    assert none.returncode != 0 and "password is required" in none.stderr
    exec_in(name, ["faillock", "--user", "alice", "--reset"])


def test_redeploys_over_ssh_change_nothing(reports: list[dict[str, Any]]) -> None:
    assert all(r["rc"] == 0 for r in reports), reports
    assert reports[0]["changed"]  # the first deploy did the work
    assert [r["changed"] for r in reports if r["mode"] == "ssh"] == \
        [0] * len([r for r in reports if r["mode"] == "ssh"]), reports


def test_no_secret_in_any_command_line_during_the_deploys(
        reports: list[dict[str, Any]]) -> None:
    for r in reports:
        # The sampler ran throughout and did see a short-lived process's command line.
        assert r["canary_seen"] and r["sweeps"] >= 10, r
        assert r["cmdline_hits"] == [], r


def test_no_secret_in_pyinfra_output(reports: list[dict[str, Any]]) -> None:
    for r in reports:
        assert r["output_chars"] > 1000, r  # -vv output was read
        assert r["output_hits"] == [], r


def test_no_secret_in_the_journal(host: Any, values: dict[str, str]) -> None:
    # Every field (messages and the _CMDLINE of every process that logged), read here.
    journal = exec_in(host.backend.name, ["journalctl", "--no-pager", "-o", "export"])
    assert journal.returncode == 0 and len(journal.stdout) > 100_000
    assert "_CMDLINE=" in journal.stdout
    leaked = [k for k, v in values.items() if v in journal.stdout]
    assert leaked == []


def test_secrets_deployed_root_only(host: Any, values: dict[str, str]) -> None:
    """The repository and relay passwords are on the server, in 0600 root files only."""
    name = host.backend.name
    for key, path in PASSWORD_FILES.items():
        f = host.file(path)
        assert (f.user, f.group, f.mode) == ("root", "root", 0o600), path
        assert exec_in(name, ["cat", path]).stdout.strip() == values[key], path


def test_no_secret_in_files_a_non_root_user_can_read(host: Any, values: dict[str, str]) -> None:
    """grep the whole file system as alice (the admin, without sudo) and as nobody, for the
    three secrets (given on stdin). A world-readable canary file proves the search reads."""
    name = host.backend.name
    canary = secrets.token_hex(16)
    exec_in(name, ["sh", "-c", "cat > /var/tmp/selfhost-canary && chmod 0644 "
                   "/var/tmp/selfhost-canary"], canary + "\n")
    try:
        patterns = "\n".join([canary, *values.values()]) + "\n"
        for user in ("alice", "nobody"):
            found = exec_in(name, ["sh", "-c", "grep -rlsF -f /dev/stdin --exclude-dir=proc "
                                   "--exclude-dir=sys --exclude-dir=dev / || true"],
                            patterns, user=user)
            files = found.stdout.split()
            assert "/var/tmp/selfhost-canary" in files, (user, found.stderr[-2000:])
            assert [f for f in files if f != "/var/tmp/selfhost-canary"] == [], user
    finally:
        exec_in(name, ["rm", "-f", "/var/tmp/selfhost-canary"])


ANSI = re.compile(r"\x1b\[[0-9;]*m")
TOTAL = re.compile(r"Grand total\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)")
PYINFRA = Path(sys.executable).parent / "pyinfra"
REPO = Path(__file__).resolve().parents[3]


def _ssh_deploy(name: str, port: int, values: dict[str, str], model: Path,
                cut_at: str | None = None) -> tuple[int, str, bool]:
    """A deploy over SSH as alice (as molecule/ssh/deploy.py runs it); with ``cut_at`` (a
    phase), the SSH connection is cut from the target's side when that phase starts: alice's
    unprivileged sshd session process is killed, as a dropped link or a closed laptop does."""
    env = {**os.environ, "SELFHOST_TEST_ADMIN_PASSWORD": values["admin_password"],
           "SELFHOST_TEST_BACKUP_PASSWORD": values["backup_password"],
           "SELFHOST_TEST_SMTP_PASSWORD": values["smtp_password"],
           "SELFHOST_SSH_PORT": str(port), "SELFHOST_SSH_KEY": str(WORK / "id_ed25519"),
           "SELFHOST_SSH_KNOWN_HOSTS": str(WORK / f"known_hosts-{name}"),
           "SELFHOST_SSH_MODEL": str(model),
           "SELFHOST_SSH_SUDO_PASSWORD": values["admin_password"], "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([str(PYINFRA), "-y", "molecule/ssh/inventory.py",
                             "deploys/home_server.py"], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    lines, cut = [], False
    for line in proc.stdout:
        lines.append(line)
        if cut_at and not cut and re.search(rf"Starting operation: .*\bselfhost {cut_at}\s*$",
                                            ANSI.sub("", line)):
            # The session's unprivileged process ("sshd: alice@notty"), not the listener.
            exec_in(name, ["pkill", "-KILL", "-u", "alice", "-x", "sshd"])
            exec_in(name, ["pkill", "-KILL", "-u", "alice", "-x", "sshd-session"])
            cut = True
    rc = proc.wait(timeout=900)
    return rc, ANSI.sub("", "".join(lines)), cut


def _port(name: str) -> int:
    out = subprocess.run(["podman", "port", name, "22/tcp"], capture_output=True, text=True,
                         check=True).stdout
    return int(out.strip().splitlines()[0].rsplit(":", 1)[1])


@pytest.mark.parametrize("phase", ["files", "reloads"])
def test_a_cut_connection_leaves_ssh_working_and_the_next_deploy_converges(
        host: Any, values: dict[str, str], phase: str) -> None:
    # Model B adds a site (new files, a Caddy reload); the link is cut when `phase` starts.
    name = host.backend.name
    port = _port(name)
    model_a = WORK / "model.yaml"
    model = json.loads(model_a.read_text())
    model["services"]["web"]["sites"].append({"host": "cut", "source": model["services"]["web"]
                                              ["sites"][0]["source"]})
    model_b = WORK / "model-cut.yaml"
    model_b.write_text(json.dumps(model, indent=2) + "\n")
    rc, out, cut = _ssh_deploy(name, port, values, model_b, cut_at=phase)
    assert cut, out[-3000:]
    assert rc != 0, out[-3000:]  # the deploy saw its connection go
    state = exec_in(name, ["sh", "-c", "systemctl is-active ssh; /usr/sbin/sshd -t && echo ok; "
                                       "find / -xdev -name '*.selfhost-new' 2>/dev/null"])
    assert state.stdout.split()[:2] == ["active", "ok"], state.stdout
    # The next deploy (model A again) reconnects, converges and removes what was staged.
    rc, out, _ = _ssh_deploy(name, port, values, model_a)
    assert rc == 0, out[-4000:]
    assert exec_in(name, ["sh", "-c", "find / -xdev -name '*.selfhost-new' 2>/dev/null"]
                   ).stdout.strip() == ""
    rc, out, _ = _ssh_deploy(name, port, values, model_a)
    totals = TOTAL.findall(out)
    assert rc == 0 and totals and totals[-1][1] in ("-", "0"), out[-3000:]
