"""The sync scenario: alice's Syncthing on "a" and bob's on "b" keep the folder `docs` in
sync over the pair's internal test network, with the device IDs of the model; the GUI stays
on the loopback, for its user and root only; nothing talks to Syncthing's public servers."""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

HERE = Path(__file__).resolve().parents[1]
A_DOCS = "/home/alice/Sync/docs"  # alice is an admin: her home
B_DOCS = "/srv/sync/bob/Sync/docs"  # bob has an account of his own, without a login


def platform(name: str) -> dict[str, Any]:
    platforms = yaml.safe_load((HERE / "molecule.yml").read_text())["platforms"]
    return dict(next(p for p in platforms if p["name"] == name))


@pytest.fixture(scope="module")
def pair(host: Any) -> dict[str, str]:
    a = str(host.backend.name)
    b = a.replace("-a-", "-b-")
    return {"a": a, "b": b, "a_ip": platform(a)["ip"], "b_ip": platform(b)["ip"]}


def sh(container: str, script: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = ["podman", "exec", container]
    argv += ["runuser", "-u", user, "--"] if user else []
    return subprocess.run([*argv, "sh", "-c", script], capture_output=True, text=True,
                          timeout=60)


def wait_for_file(container: str, path: str, content: str, seconds: int = 90) -> float:
    start = time.monotonic()
    while True:
        res = sh(container, f"cat {path} 2>/dev/null")
        if res.stdout == content:
            return time.monotonic() - start
        if time.monotonic() - start > seconds:
            state = sh(container, "ls -la $(dirname " + path + "); journalctl -u 'syncthing@*' "
                       "-n 30 --no-pager")
            raise AssertionError(f"{path} did not reach {container} in {seconds} s:\n"
                                 f"{state.stdout}{state.stderr}")
        time.sleep(1)


def test_a_file_written_on_a_appears_on_b(pair: dict[str, str]) -> None:
    name, content = f"from-a-{uuid.uuid4().hex[:8]}.txt", f"alice {uuid.uuid4()}\n"
    res = sh(pair["a"], f"printf '%s' '{content}' > {A_DOCS}/{name}", user="alice")
    assert res.returncode == 0, res.stderr
    took = wait_for_file(pair["b"], f"{B_DOCS}/{name}", content)
    print(f"{pair['a']} -> {pair['b']}: {took:.1f} s")
    owner = sh(pair["b"], f"stat -c %U {B_DOCS}/{name}").stdout.strip()
    assert owner == "bob"


def test_a_file_written_on_b_appears_on_a(pair: dict[str, str]) -> None:
    name, content = f"from-b-{uuid.uuid4().hex[:8]}.txt", f"bob {uuid.uuid4()}\n"
    res = sh(pair["b"], f"printf '%s' '{content}' > {B_DOCS}/{name}", user="bob")
    assert res.returncode == 0, res.stderr
    took = wait_for_file(pair["a"], f"{A_DOCS}/{name}", content)
    print(f"{pair['b']} -> {pair['a']}: {took:.1f} s")


def test_the_gui_is_not_reachable_from_the_other_host(pair: dict[str, str]) -> None:
    # From b, alice's GUI port on a: nothing listens there on the network.
    res = sh(pair["b"], f"curl -sS -m 5 -o /dev/null http://{pair['a_ip']}:8384/")
    assert res.returncode != 0, "alice's Syncthing GUI answered from the other host"
    # The sync port is open to it (the control: the address and the network are right).
    res = sh(pair["b"], f"timeout 5 bash -c '</dev/tcp/{pair['a_ip']}/22000'")
    assert res.returncode == 0, res.stderr


def test_the_gui_answers_on_the_loopback_for_its_user_and_root_only(
        pair: dict[str, str]) -> None:
    url = "http://127.0.0.1:8384/"
    for user in ("root", "alice"):
        res = sh(pair["a"], f"curl -sS -m 5 -o /dev/null -w '%{{http_code}}' {url}",
                 user=None if user == "root" else user)
        assert res.stdout == "200", (user, res.stdout, res.stderr)
    # Another local account is refused by the firewall (the GUI has no password).
    res = sh(pair["a"], f"runuser -u nobody -- curl -sS -m 5 -o /dev/null {url}")
    assert res.returncode != 0, "another local user reached alice's Syncthing GUI"
    listening = sh(pair["a"], "ss -Htln 'sport = :8384'").stdout.split()
    assert "127.0.0.1:8384" in listening, listening


def test_discovery_relays_and_reporting_are_off(pair: dict[str, str]) -> None:
    conf = sh(pair["a"], "cat /var/lib/syncthing/alice/config.xml").stdout
    for off in ("globalAnnounceEnabled", "localAnnounceEnabled", "relaysEnabled",
                "natEnabled", "crashReportingEnabled"):
        assert f"<{off}>false</{off}>" in conf, off
    assert "<urAccepted>-1</urAccepted>" in conf
    assert "<listenAddress>tcp://:22000</listenAddress>" in conf
    assert "<listenAddress>default</listenAddress>" not in conf


def test_the_device_id_is_the_models(pair: dict[str, str]) -> None:
    fleet = yaml.safe_load((HERE / "fleet.yaml").read_text())
    host_b = platform(pair["b"])["host"]
    expected = fleet["hosts"][host_b]["services"]["sync"]["users"][0]["devices"][0]["id"]
    res = sh(pair["a"], "syncthing serve --home=/var/lib/syncthing/alice --device-id",
             user="alice")
    assert res.stdout.strip() == expected, res.stdout + res.stderr
