"""A WireGuard tunnel between two hosts of one fleet (examples/tunnel.yaml), declared once on
`home`: both ends' rendered configurations are pinned, the request that reaches `friend`,
the controller's key pairs (X25519), and the mistakes refused at their fields."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from selfhost.compile import Target, compile_fleet
from selfhost.compose.keys import DirKeyStore, FakeKeyStore, ensure_wireguard_keypair
from selfhost.compose.requests import HealthCheck, Port, WireGuardTunnel, ZoneNetwork
from selfhost.config import ConfigError, load_fleet, load_fleet_text
from selfhost.validation import route

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "tunnel.yaml"
PINNED = ROOT / "tests" / "fixtures" / "wireguard" / "tunnel"
UPDATE = os.environ.get("SELFHOST_UPDATE_FIXTURES") == "1"
CONF = "/etc/wireguard/wg1.conf.selfhost"
KEY = "/etc/wireguard/wg1.key"


def data() -> dict[str, Any]:
    return dict(yaml.safe_load(EXAMPLE.read_text()))


def plans_of(model: dict[str, Any] | None = None, keys: Any = None,
             in_container: bool = False) -> dict[str, Any]:
    text = EXAMPLE.read_text() if model is None else yaml.safe_dump(model)
    fleet = load_fleet_text(text, "tunnel.yaml")
    return compile_fleet(fleet, {h: Target(release="trixie", in_container=in_container)
                                 for h in fleet.hosts}, keys)


@pytest.mark.parametrize("host", ["home", "friend"])
def test_both_ends_are_pinned(host: str) -> None:
    """Each end's configuration (the model's part: no private key), as rendered from
    examples/tunnel.yaml with the stand-in keys, equals its pinned copy
    (SELFHOST_UPDATE_FIXTURES=1 rewrites it)."""
    text = plans_of()[host].files()[CONF]
    pinned = PINNED / host / CONF.lstrip("/")
    if UPDATE:
        pinned.parent.mkdir(parents=True, exist_ok=True)
        pinned.write_text(text)
    assert pinned.exists(), f"{pinned} is missing (SELFHOST_UPDATE_FIXTURES=1)"
    assert text == pinned.read_text(), f"{host}: {CONF} differs from {pinned}"


def test_each_end_names_the_other_s_public_key_and_address() -> None:
    keys = FakeKeyStore()
    # The key store's entries, `~` unexpanded: the plan is the same on every machine.
    home_key = keys.wireguard_public_key("~/.config/selfhost/wireguard-keys/home-wg1")
    friend_key = keys.wireguard_public_key("~/.config/selfhost/wireguard-keys/friend-wg1")
    plans = plans_of()
    home, friend = plans["home"].files()[CONF], plans["friend"].files()[CONF]
    assert f"PublicKey = {friend_key}\n" in home and f"PublicKey = {home_key}\n" in friend
    assert "Address = 10.9.0.1/30\n" in home and "AllowedIPs = 10.9.0.2/32\n" in home
    assert "Address = 10.9.0.2/30\n" in friend and "AllowedIPs = 10.9.0.1/32\n" in friend
    assert "Endpoint = 203.0.113.20:51821\n" in home
    assert "Endpoint = 198.51.100.10:51821\n" in friend
    # The friend's host has nothing in its part of the model, yet its firewall opens the
    # tunnel's port and counts the tunnel as the VPN zone.
    rules = plans["friend"].files()["/etc/nftables.conf"]
    assert 'udp dport 51821 accept comment "wireguard-tunnels"' in rules
    assert "set vpn4 { type ipv4_addr; flags interval; elements = { 10.9.0.0/30 }; }" in rules
    home_rules = plans["home"].files()["/etc/nftables.conf"]
    assert "udp dport 51821 accept" in home_rules and "10.9.0.0/30" in home_rules


def test_the_request_that_reaches_the_other_host() -> None:
    routed = route(load_fleet(EXAMPLE))
    assert routed["home"].problems == [] and routed["friend"].problems == []
    [out] = routed["home"].outgoing
    assert isinstance(out, WireGuardTunnel)
    assert (out.on_host, out.peer, out.interface, out.port, out.address, out.peer_address,
            out.peer_endpoint) == ("friend", "home", "wg1", 51821, "10.9.0.2/30", "10.9.0.1",
                                   "198.51.100.10:51821")
    assert out.key_name == "~/.config/selfhost/wireguard-keys/friend-wg1"
    assert out.peer_key_name == "~/.config/selfhost/wireguard-keys/home-wg1"
    assert out.origin == "services.wireguard.tunnels.0"
    friend = routed["friend"].requests
    assert friend[WireGuardTunnel] == [out]
    assert [(p.port, p.proto) for p in friend[Port] if isinstance(p, Port)
            and p.origin == "wireguard-tunnels"] == [(51821, "udp")]
    assert [z.network for z in friend[ZoneNetwork] if isinstance(z, ZoneNetwork)] == \
        ["10.9.0.0/30"]
    assert "wg-quick@wg1.service" in [h.target for h in friend[HealthCheck]
                                      if isinstance(h, HealthCheck)]


def test_without_the_tunnel_nothing_on_the_friend_s_host() -> None:
    model = data()
    del model["hosts"]["home"]["services"]["wireguard"]["tunnels"]
    plans = plans_of(model)
    assert not any("wireguard" in p for p in plans["friend"].files())
    assert CONF not in plans["home"].files()


def test_private_keys_come_from_the_key_store_and_never_enter_the_plan(tmp_path: Path) -> None:
    model = data()
    model["hosts"]["home"]["services"]["wireguard"]["key_dir"] = str(tmp_path / "keys")
    plans = plans_of(model, keys=DirKeyStore(), in_container=True)
    for host, other in (("home", "friend"), ("friend", "home")):
        private = (tmp_path / "keys" / f"{host}-wg1").read_text().strip()
        public = (tmp_path / "keys" / f"{host}-wg1.pub").read_text().strip()
        assert oct((tmp_path / "keys" / f"{host}-wg1").stat().st_mode & 0o777) == "0o600"
        plan = plans[host]
        [key_file] = [s.file for s in plan.steps if type(s).__name__ == "File"
                      and s.file.path == KEY]
        assert key_file.secret_file == str(tmp_path / "keys" / f"{host}-wg1")
        assert key_file.mode == "0600" and key_file.content == ""
        dumped = json.dumps(plan.to_data()) + plan.render()
        assert private not in dumped
        assert f"PublicKey = {public}\n" in plans[other].files()[CONF]
        assert "wireguard-go" in next(s.names for s in plan.steps
                                      if type(s).__name__ == "Packages")
    assert oct((tmp_path / "keys").stat().st_mode & 0o777) == "0o700"


def test_the_key_pair_is_x25519(tmp_path: Path) -> None:
    """RFC 7748, section 6.1: Alice's private key gives Alice's public key."""
    path = tmp_path / "alice"
    path.write_text(base64.b64encode(bytes.fromhex(
        "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")).decode() + "\n")
    public = ensure_wireguard_keypair(path)
    assert base64.b64decode(public).hex() == \
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    assert (tmp_path / "alice.pub").read_text() == public + "\n"
    new = tmp_path / "new"
    assert ensure_wireguard_keypair(new) == ensure_wireguard_keypair(new)  # made once
    assert len(base64.b64decode(new.read_text().strip())) == 32
    (tmp_path / "bad").write_text("not a key\n")
    with pytest.raises(ValueError, match="not a WireGuard private key"):
        ensure_wireguard_keypair(tmp_path / "bad")


def issues_of(model: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as exc:
        load_fleet_text(yaml.safe_dump(model), "tunnel.yaml")
    return [(i.path, i.message) for i in exc.value.issues]


@pytest.mark.parametrize("change,field,message", [
    ({"host": "nobody"}, "host", "no host 'nobody' in this fleet (hosts: friend, home)"),
    ({"host": "home"}, "host", "a tunnel joins two hosts: this one is home"),
    ({"host": "friend", "interface": "wg0"}, "interface", "wg0 is this host's VPN interface"),
    ({"host": "friend", "port": 51820}, "port", "UDP 51820 is this host's VPN port"),
    ({"host": "friend", "network": "10.8.0.0/30"}, "network",
     "10.8.0.0/30 overlaps this host's VPN network 10.8.0.0/24"),
    ({"host": "friend", "network": "10.9.0.0/32"}, "network", "a tunnel network needs two"),
    ({"host": "friend", "endpoint": "friend.example.net:51821"}, "endpoint",
     "without a port"),
    ({"host": "friend", "interface": "tun0"}, "interface", "does not have the expected form"),
])
def test_tunnel_mistakes_are_located(change: dict[str, Any], field: str, message: str) -> None:
    model = data()
    model["hosts"]["home"]["services"]["wireguard"]["tunnels"] = [change]
    issues = issues_of(model)
    assert any(p == f"hosts.home.services.wireguard.tunnels.0.{field}" and message in m
               for p, m in issues), issues


def test_collisions_with_the_other_host_are_refused_where_the_tunnel_is_declared() -> None:
    model = data()
    # The friend runs its own VPN on the tunnel's port and network, and a tunnel of its own
    # to a third host on the same interface.
    model["hosts"]["friend"]["services"] = {"wireguard": {
        "port": 51821, "network": "10.9.0.0/24",
        "tunnels": [{"host": "third", "interface": "wg1", "port": 51900,
                     "network": "10.10.0.0/30"}]}}
    model["hosts"]["third"] = {"hostname": "third", "domain": "example.net",
                               "addresses": {"public": ["203.0.113.30"]}}
    issues = issues_of(model)
    at = "hosts.home.services.wireguard.tunnels.0"
    assert (f"{at}.port", "UDP 51821 is friend's VPN port: choose another") in issues, issues
    assert (f"{at}.network", "10.9.0.0/30 overlaps friend's VPN network 10.9.0.0/24: choose "
            "another") in issues, issues
    assert (f"{at}.interface", "wg1: friend also has friend's services.wireguard.tunnels.0 "
            "with the same interface: choose another") in issues, issues


def test_two_tunnels_on_one_host_need_their_own_interface_port_and_network() -> None:
    model = data()
    model["hosts"]["third"] = {"hostname": "third", "domain": "example.net",
                               "addresses": {"public": ["203.0.113.30"]}}
    model["hosts"]["home"]["services"]["wireguard"]["tunnels"].append({"host": "third"})
    issues = issues_of(model)
    at = "hosts.home.services.wireguard.tunnels.1"
    assert any(p == f"{at}.interface" and "home also has home's services.wireguard.tunnels.0"
               in m for p, m in issues), issues
    assert any(p == f"{at}.network" for p, _ in issues), issues
    # With their own, both tunnels are fine.
    model["hosts"]["home"]["services"]["wireguard"]["tunnels"][1].update(
        {"interface": "wg2", "port": 51822, "network": "10.9.1.0/30"})
    plans = plans_of(model)
    assert "Endpoint = 203.0.113.30:51822\n" in plans["home"].files()[
        "/etc/wireguard/wg2.conf.selfhost"]
    assert "Address = 10.9.1.2/30\n" in plans["third"].files()["/etc/wireguard/wg2.conf.selfhost"]


def test_without_any_address_an_endpoint_is_needed() -> None:
    model = data()
    del model["hosts"]["home"]["addresses"]
    del model["hosts"]["friend"]["addresses"]
    issues = issues_of(model)
    assert any(p == "hosts.home.services.wireguard.tunnels.0.endpoint"
               and "give `endpoint`" in m for p, m in issues), issues
    model["hosts"]["home"]["services"]["wireguard"]["tunnels"][0]["endpoint"] = \
        "friend.example.net"
    plans = plans_of(model)
    assert "Endpoint = friend.example.net:51821\n" in plans["home"].files()[CONF]
    assert "Endpoint" not in plans["friend"].files()[CONF]  # only home connects


def test_the_other_host_s_own_vpn_and_the_tunnel_live_side_by_side() -> None:
    model = data()
    model["hosts"]["friend"]["services"] = {"wireguard": {"network": "10.7.0.0/24"}}
    plan = plans_of(model, in_container=True)["friend"]
    files = plan.files()
    assert "Address = 10.7.0.1/24\n" in files["/etc/wireguard/wg0.conf.selfhost"]
    assert "Address = 10.9.0.2/30\n" in files[CONF]
    rules = files["/etc/nftables.conf"]
    assert "elements = { 10.7.0.0/24, 10.9.0.0/30 }" in rules
    assert 'udp dport 51820 accept comment "wireguard"' in rules
    assert 'udp dport 51821 accept comment "wireguard-tunnels"' in rules
    units = [s.name for s in plan.steps if type(s).__name__ == "UnitState"]
    assert {"wg-quick@wg0.service", "wg-quick@wg1.service"} <= set(units)


def test_a_tunnel_taken_out_of_the_model_is_stopped_on_the_other_host_too() -> None:
    """The far end lives in `friend`'s plan although `friend`'s part of the model never names
    it: the removal manifest covers the module serving it, so once the tunnel leaves `home`'s
    model, the next deploy of `friend` stops its unit and removes its configuration (the
    controller keeps the key), instead of leaving a tunnel up that nobody declares."""
    from selfhost.compile.removal import MANIFEST, removal_commands, removed

    before = {h: p.files()[MANIFEST] for h, p in plans_of().items()}
    assert "wireguard-tunnels" in json.loads(before["friend"])["services"]
    model = data()
    del model["hosts"]["home"]["services"]["wireguard"]["tunnels"]
    after = {h: p.files()[MANIFEST] for h, p in plans_of(model).items()}
    assert "wireguard-tunnels" not in json.loads(after["friend"])["services"]
    [gone] = removed(before["friend"], after["friend"])
    assert gone.path == "wireguard-tunnels" and not gone.partial
    assert gone.units == ("wg-quick@wg1.service",)
    # The configuration made on the host (with the key) and the private key go too: the
    # controller's key store keeps the key, as it made it.
    assert gone.files == ("/etc/wireguard/wg1.conf", CONF, KEY)
    cmds = "\n".join(removal_commands(gone, False, ()))
    assert "systemctl disable --now" in cmds and "wg1" in cmds
    # On `home` the tunnel was part of services.wireguard, which stays: that part is undone.
    [part] = removed(before["home"], after["home"])
    assert part.partial and part.path == "services.wireguard"
    assert CONF in part.files and part.label.startswith("part of services.wireguard (")
    # A second deploy of the same model removes nothing.
    assert removed(after["friend"], after["friend"]) == []
    assert removed(before["home"], before["home"]) == []
