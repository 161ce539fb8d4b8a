"""No lockout: a deploy whose sshd settings would be invalid stops before reloading sshd.

A stray drop-in that sshd cannot parse is put in /etc/ssh/sshd_config.d/ (selfhost's
sshd_config includes that directory), then a changed model is deployed. The staged
sshd_config fails `sshd -t`, so the deploy must stop: the live file is untouched, sshd is not
reloaded (same main PID) and SSH answers on the port published on 127.0.0.1 before, during
and after.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
BROKEN = "/etc/ssh/sshd_config.d/zz-broken.conf"


def _ssh_answers(port: int) -> bool:
    done = subprocess.run(["ssh-keyscan", "-T", "5", "-t", "ed25519", "-p", str(port), "127.0.0.1"],
                          capture_output=True, text=True, timeout=30, check=False)
    return "ssh-ed25519" in done.stdout


def _published_ssh_port(name: str) -> int:
    out = subprocess.run(["podman", "port", name, "22/tcp"], capture_output=True, text=True,
                         check=True).stdout.strip()
    address, _, port = out.splitlines()[0].rpartition(":")
    assert address == "127.0.0.1", f"SSH must be published on loopback only, not {address}"
    return int(port)


def test_invalid_sshd_settings_stop_the_deploy_before_reload(host: Any, tmp_path: Path) -> None:
    name = host.backend.name
    port = _published_ssh_port(name)
    assert _ssh_answers(port)
    sha_before = host.check_output("sha1sum /etc/ssh/sshd_config")
    pid_before = host.check_output("systemctl show -p MainPID --value ssh.service")

    model = yaml.safe_load((REPO / "examples" / "home.yaml").read_text())
    model["services"]["web"]["sites"][0]["source"] = str(REPO / "examples" / "site")
    model.setdefault("hardening", {}).setdefault("ssh", {})["max_auth_tries"] = 4
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(model))

    since = host.check_output("date +%s")
    host.run_test(f"echo 'ThisIsNotAnSshdOption yes' > {BROKEN}")
    try:
        done = subprocess.run(
            [str(REPO / ".venv/bin/pyinfra"), "-y", f"@podman/{name}", "deploys/home_server.py",
             "--data", f"selfhost_config={changed}"],
            cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
        output = done.stdout + done.stderr
        assert done.returncode != 0, output
        assert "the new version failed its check" in output, output
        assert host.check_output("sha1sum /etc/ssh/sshd_config") == sha_before
        assert not host.file("/etc/ssh/sshd_config.selfhost-new").exists
        assert host.service("ssh").is_running
        assert host.check_output("systemctl show -p MainPID --value ssh.service") == pid_before
        journal = host.check_output(f"journalctl -u ssh.service --since @{since} -o cat")
        assert "Reload" not in journal and "SIGHUP" not in journal, journal
        assert _ssh_answers(port)
    finally:
        host.run_test(f"rm -f {BROKEN}")
    assert _ssh_answers(port)


@pytest.fixture(autouse=True)
def _only_once(release: str) -> None:
    if release != "bookworm":
        pytest.skip("the no-lockout scenario runs on one release")
