"""Checks of the `ssh` scenario: the admin's password works for sudo, a re-deploy over SSH
changes nothing, and the model's three secrets never leak (command lines, pyinfra's output,
the journal, files a non-root user can read). See molecule/ssh/molecule.yml."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
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
