"""The LAN resolver module (Unbound): model rules at their paths, what it asks of the others,
what it renders, and the rendered file checked by Debian's own unbound-checkconf."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from validators import Validators

from selfhost.compile import Target, compile_fleet
from selfhost.config import load_fleet
from selfhost.models.fleet import Fleet
from selfhost.services.unbound import CONFIG, DEFAULTS
from selfhost.validation import ModelError, validated

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "resolver.yaml"
SIGNED_DS = ("signed.test. DS 34621 13 2 "
             "1BACB051F9630561CB4C0635DD434E761982F70AAC774D44844543C42DBF79EC")


def model(**resolver: Any) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    data["services"]["resolver"].update(copy.deepcopy(resolver))
    return data


def files(data: dict[str, Any], release: str = "bookworm") -> dict[str, str]:
    [plan] = compile_fleet(Fleet.of(validated(data)),
                           {data["hostname"]: Target(release=release)}).values()  # type: ignore[arg-type]
    return plan.files()


def conf(data: dict[str, Any]) -> str:
    return files(data)[CONFIG]


def problem_locs(data: dict[str, Any]) -> list[tuple[Any, ...]]:
    with pytest.raises((ValidationError, ModelError)) as err:
        validated(data)
    e = err.value
    if isinstance(e, ModelError):
        return [tuple(p.loc) for p in e.problems if p.severity == "error"]
    return [tuple(x["loc"]) for x in e.errors()]


# ------------------------------------------------------------------ what it renders


def test_the_example_listens_on_lan_and_vpn_and_opens_53_there_only() -> None:
    [plan] = compile_fleet(load_fleet(EXAMPLE), {"nas": Target(in_container=True)}).values()
    f = plan.files()
    text = f[CONFIG]
    assert [ln for ln in text.splitlines() if "interface:" in ln] == [
        "    interface: 10.8.0.1", "    interface: 192.168.1.10"]
    assert "0.0.0.0" not in text.replace("0.0.0.0/0 refuse", "")
    rules = f["/etc/nftables.conf"]
    for proto in ("udp", "tcp"):
        assert f'ip saddr @lan4 {proto} dport 53 accept comment "resolver"' in rules
        assert f'ip saddr @vpn4 {proto} dport 53 accept comment "resolver"' in rules
        assert f"\t\t{proto} dport 53 accept" not in rules  # never the internet zone
    assert "RESOLVCONF=false" in f[DEFAULTS]  # the host's own resolv.conf is left alone
    packages = next(s.names for s in plan.steps if type(s).__name__ == "Packages")
    assert {"unbound", "dns-root-data"} <= set(packages)
    assert {(h.kind, h.target) for h in plan.health} >= {("unit", "unbound.service"),
                                                         ("tcp", "192.168.1.10:53")}


def test_access_control_is_the_zones_networks_and_the_host() -> None:
    text = conf(model())
    acl = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("access-control")]
    assert acl == [
        "access-control: 0.0.0.0/0 refuse", "access-control: ::/0 refuse",
        "access-control: 127.0.0.0/8 refuse", "access-control: ::1/128 refuse",
        "access-control: 192.168.1.0/24 allow",   # hardening.firewall.lan
        "access-control: 10.8.0.0/24 allow",      # the VPN module's tunnel network
        "access-control: 192.168.1.10/32 allow", "access-control: 10.8.0.1/32 allow",
        "access-control-view: 192.168.1.0/24 lan", "access-control-view: 192.168.1.10/32 lan",
        "access-control-view: 10.8.0.0/24 vpn", "access-control-view: 10.8.0.1/32 vpn",
    ]


def test_split_horizon_views_answer_each_zone_with_its_own_address() -> None:
    text = conf(model())
    lan = text.split('name: "lan"')[1].split("view:")[0]
    vpn = text.split('name: "vpn"')[1]
    assert '"www.home.arpa. A 192.168.1.10"' in lan and '"nas.home.arpa. A 192.168.1.10"' in lan
    assert '"www.home.arpa. A 10.8.0.1"' in vpn and "192.168.1.10" not in vpn
    assert '    local-data: "printer.home.arpa. A 192.168.1.20"' in text
    assert '    local-data-ptr: "192.168.1.10 nas.home.arpa"' in text


def test_other_modules_virtual_hosts_are_split_horizon_names() -> None:
    data = model()
    data["services"]["radicale"] = {"host": "dav", "users": [
        {"name": "alice", "password": {"env": "DAV_ALICE_PASSWORD"}}]}
    text = conf(data)
    assert '"dav.home.arpa. A 192.168.1.10"' in text and '"dav.home.arpa. A 10.8.0.1"' in text


def test_blocklist_entries_are_normalised_and_nxdomain() -> None:
    text = conf(model(blocklist=["Ads.Example.COM.", "tracker.example.net", "ads.example.com"]))
    assert [ln.strip() for ln in text.splitlines() if "always_nxdomain" in ln] == [
        'local-zone: "ads.example.com." always_nxdomain',
        'local-zone: "tracker.example.net." always_nxdomain']


def test_stub_zone_with_its_trust_anchor() -> None:
    text = conf(model(stub_zones=[{"name": "signed.test", "addresses": ["192.168.1.53"]}],
                      trust_anchors=["signed.test.  3600 IN DS 34621 13 2 "
                                     "1bacb051f9630561cb4c0635dd434e761982f70aac774d44844543c4"
                                     "2dbf79ec"]))
    assert f'    trust-anchor: "{SIGNED_DS}"' in text
    assert 'stub-zone:\n    name: "signed.test."\n    stub-addr: 192.168.1.53' in text
    # Under a zone Unbound serves itself by default (test., home.arpa.): made transparent,
    # or the stub is never asked (seen: NXDOMAIN without this line).
    assert '    local-zone: "signed.test." transparent' in text


def test_lan_only_resolver_has_no_vpn_view_or_port() -> None:
    data = model(zones=["lan"])
    f = files(data)
    assert 'name: "vpn"' not in f[CONFIG] and "interface: 10.8.0.1" not in f[CONFIG]
    assert "@vpn4 udp dport 53" not in f["/etc/nftables.conf"]


def test_rendering_is_the_same_on_both_releases() -> None:
    assert files(model(), "bookworm")[CONFIG] == files(model(), "trixie")[CONFIG]


# ------------------------------------------------------------------ validation at the path


def test_a_resolver_without_a_lan_or_vpn_address_is_refused() -> None:
    data = model()
    data.pop("addresses")
    data["services"].pop("wireguard")
    assert ("services", "resolver", "zones") in problem_locs(data)
    with pytest.raises(ModelError, match=r"this host has no address there: set addresses\.lan"):
        validated(data)


def test_a_vpn_without_a_vpn_address_for_the_resolver_is_refused() -> None:
    data = model()
    data["addresses"].pop("vpn")
    with pytest.raises(ModelError, match=r"set addresses\.vpn"):
        validated(data)
    validated(model(zones=["lan"]) | {"addresses": {"lan": ["192.168.1.10"]}})


@pytest.mark.parametrize("entry,message", [
    ("*.ads.example.com", "no wildcards"),
    ("https://ads.example.com/", "is a URL"),
    ("0.0.0.0 ads.example.com", "contains spaces"),
    ("ads..example.com", "is not a domain name"),
    ("-ads.example.com", "is not a domain name"),
    ("ads.exa mple.com", "contains spaces"),
    ("192.168.1.1", "looks like an IP address"),
    ("", "an empty name"),
    ("a" * 64 + ".com", "is not a domain name"),
])
def test_malformed_blocklist_entries_are_refused_at_their_index(entry: str,
                                                               message: str) -> None:
    data = model(blocklist=["ok.example.com", entry])
    assert problem_locs(data) == [("services", "resolver", "blocklist", 1)]
    with pytest.raises(ValidationError, match=message):
        validated(data)


def test_a_blocklist_entry_covering_a_split_horizon_name_is_refused() -> None:
    data = model(blocklist=["home.arpa"])
    assert problem_locs(data) == [("services", "resolver", "blocklist", 0)]
    with pytest.raises(ModelError, match=r"would block nas\.home\.arpa"):
        validated(data)


def test_a_split_horizon_name_without_an_address_is_refused() -> None:
    data = model(names=[{"name": "printer"}])
    assert problem_locs(data) == [("services", "resolver", "names", 0)]
    with pytest.raises(ValidationError, match="has no address"):
        validated(data)


def test_a_name_that_is_already_the_servers_is_refused() -> None:
    data = model(names=[{"name": "www", "addresses": ["192.168.1.99"]}])
    assert problem_locs(data) == [("services", "resolver", "names", 0, "name")]


@pytest.mark.parametrize("anchor", [
    "signed.test. DS 34621 13 2 nothex",
    "signed.test. A 192.0.2.1",
    "signed.test. DNSKEY 257 4 13 AAAA",
    "DS 34621 13 2 1BAC",
])
def test_malformed_trust_anchors_are_refused(anchor: str) -> None:
    data = model(trust_anchors=[anchor])
    assert problem_locs(data) == [("services", "resolver", "trust_anchors", 0)]


# ------------------------------------------------------------------ Debian's own check


@pytest.mark.parametrize("release", ["bookworm", "trixie"])
def test_unbound_checkconf_accepts_the_rendered_file_and_rejects_broken_ones(
        release: str, validators: Validators) -> None:
    data = model(stub_zones=[{"name": "signed.test", "addresses": ["192.168.1.53"]}],
                 trust_anchors=[SIGNED_DS])
    [plan] = compile_fleet(Fleet.of(validated(data)),
                           {"nas": Target(release=release)}).values()  # type: ignore[arg-type]
    step = next(s for s in plan.steps if getattr(s, "file", None) is not None
                and s.file.path == CONFIG)  # type: ignore[attr-defined]
    f = step.file  # type: ignore[attr-defined]
    assert f.validate and "unbound-checkconf" in f.validate
    ok = validators.check(release, f.path, f.content, f.validate)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for broken in (f.content.replace("always_nxdomain", "always_nxdomian", 1),
                   f.content.replace("view-first: yes", "view-first: maybe", 1),
                   f.content + 'server:\n    access-control: 192.168.1.0/24 permit\n',
                   # A file it names that does not exist.
                   f.content + 'server:\n    auto-trust-anchor-file: "/nonexistent/root.key"\n'):
        res = validators.check(release, f.path, broken, f.validate)
        assert res.returncode != 0, broken


def test_port_53_is_the_resolvers() -> None:
    data = model()
    data["hardening"]["firewall"]["extra_ports"] = [
        {"port": 53, "proto": "udp", "reason": "another DNS server"}]
    with pytest.raises(ModelError, match=r"port 53/udp is requested by both"):
        validated(data)
