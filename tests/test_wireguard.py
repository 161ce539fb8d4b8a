"""The WireGuard module: model rules, what it requests of the others, what it renders."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from selfhost.cli import main
from selfhost.compile import Target, compile_fleet
from selfhost.config import load_fleet
from selfhost.models.fleet import Fleet
from selfhost.validation import ModelError, validated

ROOT = Path(__file__).resolve().parent.parent
LAPTOP = (ROOT / "tests" / "fixtures" / "wireguard" / "laptop.pub").read_text().strip()


def model(**wg: Any) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "vpn.yaml").read_text())
    data["services"]["wireguard"].update(copy.deepcopy(wg))
    return data


def test_the_example_composes_vpn_firewall_kernel_and_web() -> None:
    [plan] = compile_fleet(load_fleet(ROOT / "examples" / "vpn.yaml"),
                           {"nas": Target(in_container=True)}).values()
    f = plan.files()
    conf = f["/etc/wireguard/wg0.conf.selfhost"]
    assert "Address = 10.8.0.1/24" in conf and f"PublicKey = {LAPTOP}" in conf
    assert "PrivateKey" not in conf  # the key is added on the server
    rules = f["/etc/nftables.conf"]
    assert 'udp dport 51820 accept comment "wireguard"' in rules
    assert 'iifname "wg0" accept comment "wireguard"' in rules
    assert 'ip saddr 10.8.0.0/24 masquerade comment "wireguard"' in rules
    assert "ip saddr @vpn4 tcp dport 443 accept" in rules  # the calendars: VPN only
    assert "# requested by services.wireguard\nnet.ipv4.ip_forward = 1" in \
        f["/etc/sysctl.d/99-zz-selfhost-hardening.conf"]
    assert "@outside not remote_ip 10.8.0.0/24" in f["/etc/caddy/Caddyfile"]
    packages = next(s.names for s in plan.steps if type(s).__name__ == "Packages")
    assert {"wireguard-tools", "wireguard-go"} <= set(packages)
    [plan_vm] = compile_fleet(load_fleet(ROOT / "examples" / "vpn.yaml"),
                              {"nas": Target(in_container=False)}).values()
    assert "wireguard-go" not in next(s.names for s in plan_vm.steps
                                      if type(s).__name__ == "Packages")


def test_without_internet_access_no_forwarding_and_no_nat() -> None:
    data = model(internet_access=False)
    for p in data["services"]["wireguard"]["peers"]:
        p.pop("route_all", None)
    [plan] = compile_fleet(Fleet.of(validated(data))).values()
    f = plan.files()
    assert "masquerade" not in f["/etc/nftables.conf"]
    assert "net.ipv4.ip_forward = 0" in f["/etc/sysctl.d/99-zz-selfhost-hardening.conf"]


@pytest.mark.parametrize("peer,message", [
    ({"name": "x", "public_key": "not-a-key", "address": "10.8.0.9"}, "not a WireGuard public key"),
    ({"name": "x", "public_key": LAPTOP, "address": "10.8.0.9"}, "the same public key"),
    ({"name": "x", "public_key": "BBBB/vZzcL0GQAvfRbxBaRtgfs6INy1tYZ3QAz2t+T8=",
      "address": "10.9.0.2"}, "is not a free host address of 10.8.0.0/24"),
    ({"name": "x", "public_key": "AAAA/vZzcL0GQAvfRbxBaRtgfs6INy1tYZ3QAz2t+T8=",
      "address": "10.8.0.1"}, "the server is 10.8.0.1"),
])
def test_bad_peers_are_refused(peer: dict[str, Any], message: str) -> None:
    data = model()
    data["services"]["wireguard"]["peers"].append(peer)
    with pytest.raises((ValidationError, ModelError), match=message):
        validated(data)


def test_route_all_needs_internet_access() -> None:
    with pytest.raises(ModelError, match="routes all its traffic through home"):
        validated(model(internet_access=False))


def test_vpn_only_service_without_a_vpn_is_refused() -> None:
    data = model()
    del data["services"]["wireguard"]
    with pytest.raises(ModelError, match="is for the VPN only, but there is no VPN"):
        validated(data)


def test_vpn_peer_prints_a_config_without_the_private_key(capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    assert main(["vpn-peer", str(ROOT / "examples" / "vpn.yaml"), "laptop", "--no-qr"]) == 0
    out = capsys.readouterr().out
    assert "Address = 10.8.0.2/32" in out and "Endpoint = home.example.org:51820" in out
    assert "AllowedIPs = 10.8.0.0/24" in out and "PrivateKey = <this device" in out
    assert main(["vpn-peer", str(ROOT / "examples" / "vpn.yaml"), "nobody"]) == 2
