"""The wgfleet scenario: a WireGuard tunnel between two hosts of one fleet, declared once on
`home` (molecule/wgfleet/fleet.yaml); `friend` gets its end from that declaration.

Each test runs on every host and looks at its end and, through `podman exec`, at its
partner's: the tunnel's unit runs, its private key (uploaded from the controller's key store)
is root's only and absent from the model's part of the configuration, the peer's public key is
the partner's own, a handshake is recent on both ends, and pings cross the tunnel both ways.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

HERE = Path(__file__).resolve().parents[1]
IFACE = "wg1"


def platform(name: str) -> dict[str, Any]:
    platforms = yaml.safe_load((HERE / "molecule.yml").read_text())["platforms"]
    return dict(next(p for p in platforms if p["name"] == name))


def podman_exec(name: str, *argv: str, timeout: int = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", "exec", name, *argv], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def me(host: Any) -> dict[str, Any]:
    return platform(str(host.backend.name))


def test_the_tunnel_runs_with_a_key_that_stays_root_s(host: Any) -> None:
    unit = host.service(f"wg-quick@{IFACE}")
    assert unit.is_running and unit.is_enabled
    key = host.file(f"/etc/wireguard/{IFACE}.key")
    assert key.mode == 0o600 and key.user == "root" and len(key.content_string.strip()) == 44
    conf = host.file(f"/etc/wireguard/{IFACE}.conf")  # made on the host, with the key
    assert conf.mode == 0o600 and conf.user == "root"
    assert "PrivateKey" not in host.file(f"/etc/wireguard/{IFACE}.conf.selfhost").content_string
    assert "private key: (hidden)" in host.check_output(f"wg show {IFACE}")


def test_the_peer_is_the_partner_s_own_key(host: Any, me: dict[str, Any]) -> None:
    partner = podman_exec(me["peer"], "wg", "show", IFACE, "public-key")
    assert partner.returncode == 0, partner.stderr
    assert host.check_output(f"wg show {IFACE} peers").split() == [partner.stdout.strip()]
    assert host.check_output(f"wg show {IFACE} listen-port").strip() == "51821"


def test_a_recent_handshake_and_pings_through_the_tunnel(host: Any, me: dict[str, Any]) -> None:
    other = platform(me["peer"])["tunnel"]
    # The keepalives start the handshake at once; a ping would too.
    deadline = time.monotonic() + 60
    stamp = 0
    while time.monotonic() < deadline:
        out = host.check_output(f"wg show {IFACE} latest-handshakes").split()
        stamp = int(out[1]) if len(out) == 2 else 0
        if stamp:
            break
        time.sleep(1)
    now = int(host.check_output("date +%s"))
    assert 0 < now - stamp < 300, (stamp, now)
    ping = host.run(f"ping -c 3 -W 2 -I {IFACE} {other}")
    assert ping.rc == 0, ping.stdout + ping.stderr
    assert " 0% packet loss" in ping.stdout
    # The tunnel address answers through the tunnel only: not from the test network.
    assert host.check_output(f"ip -4 -o addr show dev {IFACE}").split()[3] == \
        f"{me['tunnel']}/30"


def test_the_port_is_open_in_the_firewall(host: Any) -> None:
    rules = host.check_output("nft list table inet selfhost")
    assert "udp dport 51821 accept" in rules


def test_zz_taking_the_tunnel_out_of_the_model_stops_both_ends(host: Any,
                                                               me: dict[str, Any]) -> None:
    """Last (it changes the hosts): the tunnel leaves `home`'s part of the fleet file, and one
    deploy of both hosts stops both ends. `friend`'s own part of the model never named the
    tunnel: its end goes because the removal manifest covers the module serving it. Run once
    per release, from the friend's side."""
    name = str(host.backend.name)
    if not name.startswith("friend-"):
        pytest.skip("run once per release, from the friend's side")
    home = me["peer"]
    fleet = yaml.safe_load((HERE / "fleet.yaml").read_text())
    del fleet["hosts"][home]["services"]["wireguard"]["tunnels"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fleet.yaml"
        path.write_text(yaml.safe_dump(fleet))
        inventory = Path(tmp) / "inventory.py"
        inventory.write_text(
            f"hosts = [(f'@podman/wgf-{{h}}', {{'selfhost_config': {str(path)!r}, "
            f"'selfhost_host': h}}) for h in {[home, name]!r}]\n")
        repo = HERE.parents[1]
        res = subprocess.run([str(repo / ".venv" / "bin" / "pyinfra"), "-y", str(inventory),
                              "deploys/home_server.py"], cwd=repo, capture_output=True,
                             text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    log = res.stdout + res.stderr
    assert "part of services.wireguard" in log and "wireguard-tunnels was removed" in log, log
    for who in (name, home):
        state = podman_exec(who, "systemctl", "is-active", f"wg-quick@{IFACE}")
        assert state.stdout.strip() in ("inactive", "failed"), (who, state.stdout)
        enabled = podman_exec(who, "systemctl", "is-enabled", f"wg-quick@{IFACE}")
        assert enabled.stdout.strip() != "enabled", (who, enabled.stdout)
        for left in (f"{IFACE}.conf.selfhost", f"{IFACE}.conf", f"{IFACE}.key"):
            gone = podman_exec(who, "test", "-e", f"/etc/wireguard/{left}")
            assert gone.returncode == 1, (who, left)
        link = podman_exec(who, "ip", "link", "show", IFACE)
        assert link.returncode != 0, (who, link.stdout)
    # `selfhost check` names what left the model on the friend's host.
    removed = podman_exec(name, "cat", "/var/lib/selfhost/removed.tsv")
    assert removed.stdout.startswith("wireguard-tunnels\t"), removed.stdout
    rules = podman_exec(name, "nft", "list", "table", "inet", "selfhost")
    assert "udp dport 51821 accept" not in rules.stdout
