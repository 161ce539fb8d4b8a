"""The composition layer: requests and providers, merge rules and conflicts, ordering, the
fleet, and one contract test per request kind that its provider must pass.

The tests build hosts from real models and, where a requester is needed that no shipped
module is, a small test module handed to the router (the router takes any module list: no
compiler is patched)."""

from __future__ import annotations

import ast
import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest

from selfhost.compile import CompileError, Target, compile_fleet
from selfhost.compile.compiler import build_plan, collect
from selfhost.compose.keys import FakeKeyStore
from selfhost.compose.module import Contribution, Env, Module
from selfhost.compose.requests import (
    BackupMx,
    BackupSource,
    Certificate,
    DnsRecord,
    DnsSecondary,
    DnsZone,
    Forward,
    HealthCheck,
    Jail,
    LoopbackGuard,
    MailingList,
    Masquerade,
    PeerBackupAccount,
    Port,
    Request,
    Sendmail,
    Sysctl,
    SystemUser,
    VirtualHost,
    WireGuardTunnel,
    ZoneNetwork,
)
from selfhost.compose.route import Routed, merge, order, route_fleet
from selfhost.config import ConfigError, load_fleet_text
from selfhost.models.base import SecretRef
from selfhost.models.fleet import Fleet
from selfhost.models.server import Server
from selfhost.validation import ModelError, validated, validated_fleet

ROOT = Path(__file__).resolve().parent.parent
ALICE = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIO15aKF3qdwTP7p24+Rliy7SMGYyMZqFPJES7fSwQd7P "
         "alice@laptop")


def server(**overrides: Any) -> Server:
    data: dict[str, Any] = {"hostname": "box", "domain": "example.org",
                            "admins": [{"name": "alice", "ssh_keys": [ALICE]}]}
    data.update(copy.deepcopy(overrides))
    return Server.model_validate(data)


class Asker(Module):
    """A test module that requests whatever it is given."""

    uses: ClassVar[tuple[type[Request], ...]] = tuple(
        k for k in (Port, Forward, Masquerade, LoopbackGuard, ZoneNetwork, Sysctl, SystemUser, Sendmail,
                    VirtualHost, Certificate, BackupSource, DnsRecord, Jail, HealthCheck))

    def __init__(self, *requests: Request) -> None:
        self.asked = list(requests)

    def requests(self, env: Env) -> list[Request]:
        return list(self.asked)


def routed_with(s: Server, *requests: Request, path: str = "services.test"
                ) -> tuple[Fleet, Routed]:
    fleet = Fleet.of(s)
    modules = [*s.modules()[:1], (path, Asker(*requests)), *s.modules()[1:]]
    return fleet, route_fleet(fleet, {s.hostname: modules})[s.hostname]


def contributions(s: Server, *requests: Request,
                  target: Target | None = None) -> dict[str, Contribution]:
    fleet, routed = routed_with(s, *requests)
    assert not [p for p in routed.problems if p.severity == "error"], routed.problems
    return dict(collect(routed, fleet, target or Target(), FakeKeyStore()))


def files(s: Server, *requests: Request, target: Target | None = None) -> dict[str, str]:
    fleet, routed = routed_with(s, *requests)
    parts = collect(routed, fleet, target or Target(), FakeKeyStore())
    return build_plan(s, routed, parts, target or Target()).files()


# --------------------------------------------------------------------------- contracts

# One contract per request kind: a sample request, and what its provider's output must show.
# Every provider passes it with its control/service switched on; the "off" column says what
# a provider switched off with a reason still does (the kernel still writes what others ask).
CONTRACTS: list[tuple[str, Request, Callable[[dict[str, str]], bool]]] = [
    ("port", Port(8443, "tcp", "lan", origin="services.test"),
     lambda f: "ip saddr @lan4 tcp dport 8443 accept" in f["/etc/nftables.conf"]),
    ("forward", Forward("wg0", origin="services.test"),
     lambda f: 'iifname "wg0" accept' in f["/etc/nftables.conf"]),
    ("masquerade", Masquerade("10.8.0.0/24", origin="services.test"),
     lambda f: "ip saddr 10.8.0.0/24 masquerade" in f["/etc/nftables.conf"]),
    ("zone network", ZoneNetwork("vpn", "10.8.0.0/24", origin="services.test"),
     lambda f: "set vpn4 { type ipv4_addr; flags interval; elements = { 10.8.0.0/24 }; }"
     in f["/etc/nftables.conf"]),
    ("loopback guard", LoopbackGuard(5232, ("caddy", "root"), origin="services.test"),
     lambda f: "tcp dport 5232 meta skuid != { caddy, root } reject" in f["/etc/nftables.conf"]),
    ("sysctl", Sysctl("net.ipv4.ip_forward", "1", origin="services.test"),
     lambda f: "# requested by services.test\nnet.ipv4.ip_forward = 1\n"
     in f["/etc/sysctl.d/99-zz-selfhost-hardening.conf"]),
    ("jail", Jail("test-login", port="8443", filter="selfhost-test", logpath="/var/log/t.log",
                  filter_definition="[Definition]\nfailregex = ^bad <HOST>$\n",
                  origin="services.test"),
     lambda f: "[test-login]" in f["/etc/fail2ban/jail.local"]
     and "failregex" in f["/etc/fail2ban/filter.d/selfhost-test.conf"]),
    ("virtual host", VirtualHost("app.example.org", upstream="127.0.0.1:9000",
                                 origin="services.test"),
     lambda f: "app.example.org {" in f["/etc/caddy/Caddyfile"]
     and "reverse_proxy 127.0.0.1:9000" in f["/etc/caddy/Caddyfile"]),
    ("certificate", Certificate(("mail.example.org",), group="ssl-cert",
                                reload=("postfix.service",), origin="services.test"),
     lambda f: "mail.example.org\tssl-cert\tpostfix.service"
     in f["/etc/selfhost/tls/certificates.txt"]),
    ("backup source", BackupSource("/var/lib/test", before="echo dump", origin="services.test"),
     lambda f: "/var/lib/test\n" in f["/etc/selfhost/backup/include.txt"]
     and "test\t/var/lib/test" in f["/etc/selfhost/backup/services.txt"]
     and "echo dump" in f["/etc/selfhost/backup/pre-backup.sh"]),
]

BACKUP = {"repositories": [{"name": "usb", "type": "local", "path": "/var/backups/r",
                            "password": {"env": "P"}}]}


@pytest.mark.parametrize("name,request_,shown", CONTRACTS, ids=[c[0] for c in CONTRACTS])
def test_every_provider_honours_its_kind(name: str, request_: Request,
                                         shown: Callable[[dict[str, str]], bool]) -> None:
    assert shown(files(server(backup=BACKUP), request_)), name


def test_every_request_kind_has_exactly_one_provider() -> None:
    s = server()
    kinds = {k for _, m in s.modules() for k in m.provides}
    expected = {Port, Forward, Masquerade, LoopbackGuard, Sysctl, SystemUser, Sendmail,
                VirtualHost, Certificate, BackupSource, DnsRecord, Jail, HealthCheck,
                PeerBackupAccount, ZoneNetwork, DnsZone, DnsSecondary, BackupMx, WireGuardTunnel,
                MailingList}
    assert kinds == expected
    providers = [k for _, m in s.modules() for k in m.provides]
    assert len(providers) == len(set(providers))


def test_system_user_provider_creates_a_guarded_account() -> None:
    c = contributions(server(), SystemUser("radicale", home="/var/lib/radicale",
                                           groups=("ssl-cert",), origin="services.test"))
    [cmd] = [x for x in c["system"].commands if x.name.startswith("system user")]
    assert "useradd --system" in cmd.command and "radicale" in cmd.command
    assert cmd.unless is not None and "id -u radicale" in cmd.unless


def test_controls_switched_off_still_honour_requests() -> None:
    off = {"kernel": {"enabled": False, "reason": "the hoster's kernel"}}
    f = files(server(hardening=off), Sysctl("net.ipv4.ip_forward", "1", origin="services.vpn"))
    text = f["/etc/sysctl.d/99-zz-selfhost-hardening.conf"]
    assert "hardening.kernel is off: the hoster's kernel" in text
    assert "# requested by services.vpn\nnet.ipv4.ip_forward = 1\n" in text
    assert "kernel.kptr_restrict" not in text  # the control's own settings stay off
    assert "/etc/modprobe.d/selfhost-blacklist.conf" not in f


def test_nat_asked_of_a_firewall_that_is_off_fails_validation() -> None:
    s = server(hardening={"firewall": {"enabled": False, "reason": "router does it"}})
    fleet, routed = routed_with(s, Masquerade("10.8.0.0/24", origin="services.vpn"))
    problems = [p for path, m in routed.modules for p in m.assertions(routed.env(fleet, path))]
    assert [(p.loc, p.severity) for p in problems] == [(("services", "vpn"), "error")]
    assert "needs the firewall, but hardening.firewall is off (router does it)" \
        in problems[0].message


def test_jails_of_services_with_fail2ban_off_are_a_warning_in_the_plan() -> None:
    s = validated(server(hardening={"fail2ban": {"enabled": False, "reason": "router"}},
                         services={"radicale": {"users": [{"name": "a",
                                                           "password": {"env": "X"}}]}}))
    plan = compile_fleet(Fleet.of(s))["box"]
    assert any("fail2ban jail caddy-auth is not installed" in n for n in plan.notices)
    assert "Notices:" in plan.render()


# --------------------------------------------------------------------------- merge rules


def test_same_port_from_two_modules_is_a_conflict_naming_both() -> None:
    _, routed = routed_with(server(services={"web": {"sites": [{"host": "www"}]}}),
                            Port(443, "tcp", origin="services.test"))
    [p] = routed.problems
    assert p.loc == ("services", "web") and p.other == ("services", "test")
    assert p.message == "port 443/tcp is requested by both services.test and services.web"


def test_two_virtual_hosts_with_one_name_conflict() -> None:
    _, routed = routed_with(server(services={"web": {"sites": [{"host": "www"}]}}),
                            VirtualHost("www.example.org", upstream="127.0.0.1:1",
                                        origin="services.test"))
    assert [p.message for p in routed.problems] == [
        "virtual host www.example.org is requested by both services.test and "
        "services.web.sites.0"]


def test_two_sendmail_providers_conflict() -> None:
    _, routed = routed_with(server(), Sendmail("postfix", origin="services.mail"),
                            Sendmail("exim4-daemon-light", origin="services.other"))
    assert [p.message for p in routed.problems] == [
        "the sendmail role (exim4-daemon-light) is requested by both services.mail and "
        "services.other"]


def test_the_relay_client_steps_back_for_a_mail_server() -> None:
    """notify's msmtp holds the sendmail role only as a fallback: a mail server takes it."""
    s = server(notify={"email": "a@example.org", "smtp": {"host": "smtp.example.org"}})
    _, routed = routed_with(s, Sendmail("postfix", origin="services.mail"))
    assert routed.problems == []
    assert [(r.package, r.origin) for r in routed.requests[Sendmail]
            if isinstance(r, Sendmail)] == [("postfix", "services.mail")]


def test_sysctl_priorities_settle_overrides_and_equal_priorities_conflict() -> None:
    s = server(hardening={"kernel": {"sysctl_overrides": {"net.ipv4.ip_forward": "0"}}})
    # The model's override (50) beats a service (100), which beats the default (1000).
    _, routed = routed_with(s, Sysctl("net.ipv4.ip_forward", "1", origin="services.vpn"))
    assert not routed.problems
    [won] = [r for r in routed.requests[Sysctl] if isinstance(r, Sysctl)
             and r.name == "net.ipv4.ip_forward"]
    assert (won.value, won.origin) == ("0", "hardening.kernel.sysctl_overrides."
                                            "net.ipv4.ip_forward")
    _, routed = routed_with(server(), Sysctl("net.ipv4.ip_forward", "1", origin="services.vpn"),
                            Sysctl("net.ipv4.ip_forward", "0", origin="services.other"))
    assert [p.message for p in routed.problems] == [
        "sysctl net.ipv4.ip_forward: services.other wants '0' but services.vpn wants '1' "
        "(same priority 100)"]


def test_the_same_request_twice_merges() -> None:
    _, routed = routed_with(server(), Port(9000, "tcp", origin="services.test"),
                            Port(9000, "tcp", origin="services.test"))
    assert not routed.problems
    assert len([p for p in routed.requests[Port] if getattr(p, "port", 0) == 9000]) == 1


def test_merging_many_requests_compares_each_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Merge deduplicates with a set: 2000 distinct requests and their 2000 repeats cost a few
    thousand comparisons, not the 2 million of a list's `in` (1000 sites made it 5x slower)."""
    compared: list[int] = []
    real_eq = Port.__eq__

    def eq(self: Port, other: object) -> bool:
        compared.append(1)
        return real_eq(self, other)

    monkeypatch.setattr(Port, "__eq__", eq)
    ports = [Port(10_000 + i, "tcp", origin=f"services.s{i}") for i in range(2000)]
    problems: list[Any] = []
    merged = merge([*ports, *(dataclasses.replace(p) for p in ports)], problems)
    assert merged == ports and not problems
    assert len(compared) < 10_000
    # Conflicts are still found: the same port from two modules.
    merge([Port(22, origin="services.a"), Port(22, origin="services.b")], problems)
    assert [p.message for p in problems] == [
        "port 22/tcp is requested by both services.a and services.b"]


def test_a_request_without_a_provider_fails_validation() -> None:
    s = server(services={"web": {"enabled": False, "sites": [{"host": "w"}]},
                         "radicale": {"users": [{"name": "a", "password": {"env": "X"}}]}})
    with pytest.raises(ModelError, match=r"services\.radicale\.host: virtual host "
                       r"dav\.example\.org: no module on this host provides it"):
        validated(s)
    with pytest.raises(CompileError, match="no module on this host provides it"):
        compile_fleet(Fleet.of(s))


# --------------------------------------------------------------------------- ordering


def test_providers_run_after_every_module_that_uses_their_kinds() -> None:
    names = [p for p, _ in order(server().modules())]
    assert names.index("hardening.ssh") < names.index("hardening.firewall")
    assert names.index("hardening.ssh") < names.index("hardening.fail2ban")
    assert names.index("services.web") < names.index("hardening.firewall")
    assert names.index("services.web") < names.index("backup")


def test_a_cycle_between_modules_is_refused() -> None:
    class A(Module):
        provides: ClassVar[tuple[type[Request], ...]] = (Port,)
        uses: ClassVar[tuple[type[Request], ...]] = (Jail,)

    class B(Module):
        provides: ClassVar[tuple[type[Request], ...]] = (Jail,)
        uses: ClassVar[tuple[type[Request], ...]] = (Port,)

    with pytest.raises(RuntimeError, match="cycle"):
        order([("a", A()), ("b", B())])


def test_no_service_module_imports_another() -> None:
    services = ROOT / "selfhost" / "services"
    names = {p.stem for p in services.glob("*.py")} - {"__init__", "base"}
    for path in services.glob("*.py"):
        if path.stem in ("__init__", "base"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for mod in mods:
                parts = mod.split(".")
                if parts[:2] == ["selfhost", "services"] and len(parts) > 2:
                    assert parts[2] not in names - {path.stem}, f"{path.name} imports {mod}"


def test_requests_are_immutable_and_carry_their_origin() -> None:
    r = Port(80, origin="services.web")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.port = 81  # type: ignore[misc]
    _, routed = routed_with(server(), Port(9000))
    [p] = [p for p in routed.requests[Port] if getattr(p, "port", 0) == 9000]
    assert p.origin == "services.test"  # stamped by the router with the module's path


# --------------------------------------------------------------------------- fleet

FLEET = """\
defaults:
  domain: home.arpa
  admins:
    - name: alice
      ssh_keys: [{key}]
hosts:
  nas:
    hostname: nas
    addresses: {{lan: [192.168.1.10]}}
    backup:
      repositories:
        - name: off
          type: sftp
          peer: {peer}
          password: {{env: P}}
  friend:
    hostname: friend
    addresses: {{public: [203.0.113.7]}}
"""


def test_fleet_defaults_apply_to_every_host() -> None:
    fleet = load_fleet_text(FLEET.format(key=ALICE, peer="friend"), "fleet.yaml")
    assert [s.domain for s in fleet.hosts.values()] == ["home.arpa", "home.arpa"]
    assert [s.admins[0].name for s in fleet.hosts.values()] == ["alice", "alice"]


def test_fleet_errors_point_at_the_line_and_at_the_defaults() -> None:
    text = FLEET.format(key=ALICE, peer="nobody").replace("domain: home.arpa", "domain: -x")
    with pytest.raises(ConfigError) as info:
        load_fleet_text(text, "fleet.yaml")
    found = [i.format() for i in info.value.issues]
    # The bad domain is reported for each host at its line in `defaults`.
    assert "fleet.yaml:2:11: hosts.nas.domain: " in found[0]
    text = FLEET.format(key=ALICE, peer="nobody")
    with pytest.raises(ConfigError) as info:
        load_fleet_text(text, "fleet.yaml")
    [issue] = info.value.issues
    assert issue.format().startswith("fleet.yaml:14:17: hosts.nas.backup.repositories.0.peer: "
                                     "backup account for nas on nobody: no host 'nobody'")


def test_fleet_compiles_one_plan_per_host_with_both_ends_of_a_relation() -> None:
    fleet = load_fleet_text(FLEET.format(key=ALICE, peer="friend"), "fleet.yaml")
    plans = compile_fleet(fleet)
    assert sorted(plans) == ["friend", "nas"]
    assert "/etc/ssh/sshd_config.d/selfhost-backup-peers.conf" in plans["friend"].files()
    assert "/etc/ssh/sshd_config.d/selfhost-backup-peers.conf" not in plans["nas"].files()
    # The fleet's hosts never ban or rate-limit each other.
    for plan in plans.values():
        f = plan.files()
        assert "192.168.1.10 203.0.113.7" in f["/etc/fail2ban/jail.local"]
        assert "set fleet4 { type ipv4_addr; flags interval; elements = { 192.168.1.10/32, " \
            "203.0.113.7/32 }; }" in f["/etc/nftables.conf"]
        rules = f["/etc/nftables.conf"]
        assert rules.index("ip saddr @fleet4 tcp dport") < rules.index("update @ssh_meter4")


def test_compile_fleet_routes_the_fleet_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation and the plans share one routing (it used to run three times per compile)."""
    import selfhost.validation as validation

    fleet = load_fleet_text(FLEET.format(key=ALICE, peer="friend"), "fleet.yaml")
    calls: list[int] = []
    real = validation.route_fleet

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(validation, "route_fleet", counting)
    plans = compile_fleet(fleet)
    assert len(calls) == 1
    assert sorted(plans) == ["friend", "nas"]
    # Problems are still refused with the shared routing.
    fleet.hosts["nas"].admins[0].sudo = False
    with pytest.raises(CompileError, match="no admin has sudo"):
        compile_fleet(fleet)


def test_fleet_addresses_are_trusted_once_each_in_first_seen_order() -> None:
    text = FLEET.format(key=ALICE, peer="friend") + (
        "  third:\n    hostname: third\n"
        "    addresses: {lan: [192.168.1.10, 10.0.0.3], public: [203.0.113.7]}\n")
    plans = compile_fleet(load_fleet_text(text, "fleet.yaml"))
    for plan in plans.values():
        f = plan.files()
        assert "192.168.1.10 203.0.113.7 10.0.0.3\n" in f["/etc/fail2ban/jail.local"]
        assert "elements = { 10.0.0.3/32, 192.168.1.10/32, 203.0.113.7/32 }" \
            in f["/etc/nftables.conf"]


def test_one_host_file_is_a_fleet_of_one() -> None:
    s = validated(server())
    plans = compile_fleet(Fleet.of(s))
    assert list(plans) == ["box"]
    with pytest.raises(ModelError):
        validated_fleet(Fleet.of(server(admins=[{"name": "alice", "ssh_keys": [ALICE],
                                                 "sudo": False}])))


def test_python_api_builds_a_fleet_from_model_classes() -> None:
    """The main types are importable from `selfhost` and compose like the YAML does."""
    import selfhost as sh

    nas = sh.Server(hostname="nas", domain="home.arpa",
                    admins=[sh.Admin(name="alice", ssh_keys=[ALICE])],
                    services=sh.Services(radicale=sh.RadicaleService(users=[
                        sh.CalendarUser(name="alice", password=SecretRef(env="DAV_PW"))])))
    fleet = sh.validated_fleet(sh.Fleet(hosts={"nas": nas}))
    plan = sh.compile_fleet(fleet)["nas"]
    assert "dav.home.arpa {" in plan.files()["/etc/caddy/Caddyfile"]
    assert (443, "tcp") in {(p.port, p.proto) for p in plan.ports}


def test_model_no_longer_compiles_itself() -> None:
    """A port conflict parses (Pydantic checks fields only) and is found by validation."""
    data = {"hostname": "box", "domain": "example.org",
            "admins": [{"name": "alice", "ssh_keys": [ALICE]}],
            "hardening": {"ssh": {"port": 443}}, "services": {"web": {"sites": [{"host": "w"}]}}}
    Server.model_validate(data)
    with pytest.raises(ModelError, match="port 443/tcp is requested by both"):
        validated(data)


def test_the_python_deploy_example_builds_a_valid_fleet() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("__main__", ROOT / "deploys" / "python_model.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # as __main__: builds, does not deploy
    plan = compile_fleet(mod.build())["nas"]
    assert "dav.home.arpa {" in plan.files()["/etc/caddy/Caddyfile"]
    assert any(d.path == "/var/lib/radicale/collections" for d in plan.data)


def test_certificate_export_runs_on_debian(validators: Any) -> None:
    """The script the web module installs for Certificate requests, run for real in a
    Debian container: it copies Caddy's certificate and key for each requested name to
    /etc/selfhost/tls/NAME/ (the key readable by the requester's group only), does nothing
    the second time, and copies again when Caddy renewed the certificate."""
    import shlex

    from selfhost.services.web import CERT_EXPORT

    store = "/var/lib/caddy/.local/share/caddy/certificates/local/mail.example.org"
    setup = (f"mkdir -p {store} /etc/selfhost/tls /usr/local/lib/selfhost && "
             f"echo CERT1 > {store}/mail.example.org.crt && "
             f"echo KEY1 > {store}/mail.example.org.key && "
             "getent group ssl-cert >/dev/null || groupadd --system ssl-cert; "
             "printf 'mail.example.org\\tssl-cert\\tpostfix.service\\n' "
             "> /etc/selfhost/tls/certificates.txt && "
             f"printf %s {shlex.quote(CERT_EXPORT)} > /usr/local/lib/selfhost/cert-export && "
             "chmod 0755 /usr/local/lib/selfhost/cert-export")
    run = "/usr/local/lib/selfhost/cert-export"
    d = "/etc/selfhost/tls/mail.example.org"
    for release in ("bookworm", "trixie"):
        assert validators.run(release, setup).returncode == 0
        first = validators.run(release, run)
        assert first.returncode == 0, first.stderr
        assert b"certificate of mail.example.org updated" in first.stdout
        out = validators.run(release, f"cat {d}/fullchain.pem {d}/privkey.pem; "
                                      f"stat -c '%a %G' {d} {d}/privkey.pem {d}/fullchain.pem")
        assert out.stdout.decode().split("\n")[:5] == [
            "CERT1", "KEY1", "750 ssl-cert", "640 ssl-cert", "644 root"]
        again = validators.run(release, run)
        assert again.returncode == 0 and b"updated" not in again.stdout
        renewed = validators.run(release, f"echo CERT2 > {store}/mail.example.org.crt && {run}"
                                          f" && cat {d}/fullchain.pem")
        assert renewed.returncode == 0 and renewed.stdout.decode().endswith("CERT2\n")
        validators.run(release, f"rm -rf {d} /var/lib/caddy/.local")
