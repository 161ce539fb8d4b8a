"""After the killed deploys (kill_deploys.py) and the final deploy of model A: the server is
whole. Checked through testinfra's podman backend on both containers."""

from __future__ import annotations

import subprocess
from typing import Any


def test_sshd_runs_with_a_valid_configuration(host: Any) -> None:
    assert host.service("ssh").is_running
    assert host.run("/usr/sbin/sshd -t").rc == 0


def test_ssh_answers_on_the_published_port(host: Any) -> None:
    name = host.backend.name
    out = subprocess.run(["podman", "port", name, "22/tcp"], capture_output=True, text=True,
                         check=True).stdout
    port = out.strip().splitlines()[0].rsplit(":", 1)[1]
    scan = subprocess.run(["ssh-keyscan", "-T", "5", "-t", "ed25519", "-p", port, "127.0.0.1"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert "ssh-ed25519" in scan.stdout


def test_the_firewall_is_model_a_and_keeps_ssh_open(host: Any) -> None:
    ruleset = host.check_output("nft list table inet selfhost")
    assert 'tcp dport 22 accept comment "ssh"' in ruleset
    assert "dport 8080" not in ruleset  # model B's port is closed again


def test_no_staged_file_is_left_behind(host: Any) -> None:
    strays = host.check_output("find /etc /srv /home /usr/local /run -xdev "
                               "-name '*.selfhost-new' 2>/dev/null || true")
    assert strays == ""


def test_dpkg_is_healthy(host: Any) -> None:
    assert host.check_output("ls /var/lib/dpkg/updates | wc -l") == "0"
    assert host.check_output("dpkg --audit") == ""
