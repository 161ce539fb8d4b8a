"""The compiler: model + target -> plan.

Two kinds of tests:

- fixture tests (pyinfra's "args + facts -> commands" style): every JSON file in
  ``tests/fixtures/compile/`` holds a model and a target, and the exact plan data, key rendered
  files and rendered listing expected from them. Regenerate with
  ``.venv/bin/python tests/update_fixtures.py`` after an intended change and review the git diff;
- focused assertions on properties that must hold whatever the fixtures say (the SSH port is
  always open, validated files are validated, crypto lists are ssh-audit's, ...).

Every rendered file with a ``validate`` command is also checked with it, for real, in a
container of the plan's Debian release (``tests/validators.py``; podman is required).
"""

from __future__ import annotations

import configparser
import copy
import difflib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from validators import EXAMPLES, Validators

from selfhost.compile import Target, compile_server
from selfhost.compile.plan import File, Packages, Plan, Reload, Run, UnitState, User
from selfhost.hardening.kernel import BLACKLIST, HARDENED_SYSCTL
from selfhost.validation import ModelError, validated

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_DIR = ROOT / "tests" / "fixtures" / "compile"

ALICE = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIO15aKF3qdwTP7p24+Rliy7SMGYyMZqFPJES7fSwQd7P "
         "alice@laptop")
BOB = (ROOT / "tests" / "fixtures" / "keys" / "ed25519_bob.pub").read_text().strip()

SSHD_CONFIG = "/etc/ssh/sshd_config"
NFTABLES = "/etc/nftables.conf"
CADDYFILE = "/etc/caddy/Caddyfile"
JAIL = "/etc/fail2ban/jail.local"
SUDOERS = "/etc/sudoers.d/selfhost-admins"
SYSCTL = "/etc/sysctl.d/99-zz-selfhost-hardening.conf"
MODPROBE = "/etc/modprobe.d/selfhost-blacklist.conf"

# ssh-audit's built-in policies "Hardened Debian 12 (version 3)" / "Hardened Debian 13", plus
# curve25519 on Debian 13, the one key exchange there that pyinfra (paramiko) can use.
KEX = {
    "bookworm": [
        "sntrup761x25519-sha512", "sntrup761x25519-sha512@openssh.com", "curve25519-sha256",
        "curve25519-sha256@libssh.org", "diffie-hellman-group16-sha512",
        "diffie-hellman-group18-sha512", "diffie-hellman-group-exchange-sha256",
    ],
    "trixie": [
        "mlkem768x25519-sha256", "sntrup761x25519-sha512", "sntrup761x25519-sha512@openssh.com",
        "curve25519-sha256", "curve25519-sha256@libssh.org",  # for paramiko
    ],
}


def _load_updater() -> Any:
    spec = importlib.util.spec_from_file_location("update_fixtures",
                                                  ROOT / "tests" / "update_fixtures.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


updater = _load_updater()


def model(**overrides: Any) -> dict[str, Any]:
    """A minimal valid model as data, with nested ``overrides`` merged in."""
    data: dict[str, Any] = {
        "hostname": "box",
        "domain": "example.org",
        "admins": [{"name": "alice", "ssh_keys": [ALICE]}],
    }
    return _merge(data, overrides)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def build(target: Target | None = None, **overrides: Any) -> Plan:
    return compile_server(validated(model(**overrides)), target or Target())


WEB = {"services": {"web": {"sites": [{"host": "www"}]}}}


# --------------------------------------------------------------------------------------------
# Fixtures: model + target -> plan data, key files, rendered listing


FIXTURES = sorted(FIXTURE_DIR.glob("*.json"))


def _diff(name: str, expected: Any, actual: Any) -> str:
    exp = json.dumps(expected, indent=2, ensure_ascii=False).splitlines()
    act = json.dumps(actual, indent=2, ensure_ascii=False).splitlines()
    lines = list(difflib.unified_diff(exp, act, f"{name} (fixture)", f"{name} (compiled)",
                                      lineterm="", n=3))
    if len(lines) > 150:
        lines = [*lines[:150], f"... {len(lines) - 150} more diff lines"]
    return "\n".join(lines)


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_fixture(path: Path) -> None:
    fixture = json.loads(path.read_text(encoding="utf-8"))
    assert "expected" in fixture, (
        f"{path.name} has no expected output yet: run .venv/bin/python tests/update_fixtures.py")
    actual = updater.expected_for(fixture["input"])
    expected = fixture["expected"]
    problems = []
    if actual.get("plan") != expected.get("plan"):
        problems.append(_diff(f"{path.stem}: plan", expected.get("plan"), actual.get("plan")))
    for file in sorted(set(actual["files"]) | set(expected["files"])):
        if actual["files"].get(file) != expected["files"].get(file):
            problems.append(_diff(f"{path.stem}: {file}", expected["files"].get(file),
                                  actual["files"].get(file)))
    if actual.get("render") != expected.get("render"):
        problems.append(_diff(f"{path.stem}: render", expected.get("render"),
                              actual.get("render")))
    if problems:
        pytest.fail(
            "compiled output differs from the fixture. If the change is intended, run\n"
            f"    .venv/bin/python tests/update_fixtures.py {path.stem}\n"
            "and review the git diff.\n\n" + "\n\n".join(problems),
            pytrace=False,
        )


def test_fixture_set_covers_the_required_cases() -> None:
    names = {p.stem for p in FIXTURES}
    assert {
        "minimal_bookworm", "minimal_trixie", "example_home", "ssh_port_2222_allow_from",
        "web_lan_only", "disabled_controls", "extra_firewall_port",
    } <= names
    home = json.loads((FIXTURE_DIR / "example_home.json").read_text())
    assert home["input"]["model_file"] == "examples/home.yaml"


def test_fixture_inputs_are_what_they_claim() -> None:
    """Guard against a fixture silently testing something else after an edit."""
    def inp(name: str) -> dict[str, Any]:
        return json.loads((FIXTURE_DIR / f"{name}.json").read_text())["input"]

    assert inp("minimal_bookworm")["target"]["release"] == "bookworm"
    assert inp("minimal_trixie")["target"]["release"] == "trixie"
    assert "services" not in inp("minimal_bookworm")["model"]
    assert inp("ssh_port_2222_allow_from")["model"]["hardening"]["ssh"]["port"] == 2222
    assert inp("ssh_port_2222_allow_from")["model"]["hardening"]["ssh"]["allow_from"]
    assert inp("web_lan_only")["model"]["services"]["web"]["lan_only"] is True
    disabled = inp("disabled_controls")["model"]["hardening"]
    assert any(c.get("enabled") is False and c.get("reason") for c in disabled.values())
    assert inp("extra_firewall_port")["model"]["hardening"]["firewall"]["extra_ports"]


def test_updater_check_mode_reports_stale_fixture(tmp_path: Path, monkeypatch: Any,
                                                  capsys: Any) -> None:
    """`update_fixtures.py --check` exits 1 and shows a diff when a fixture is stale; the
    default mode rewrites it so that the check then passes."""
    src = json.loads((FIXTURE_DIR / "minimal_trixie.json").read_text())
    src["expected"]["plan"]["hostname"] = "stale.example.org"
    (tmp_path / "stale.json").write_text(updater.dump(src))
    monkeypatch.setattr(updater, "FIXTURES", tmp_path)
    assert updater.main(["--check"]) == 1
    out = capsys.readouterr().out
    assert "STALE    stale.json" in out
    assert '-      "hostname": "stale.example.org",' in out
    assert updater.main([]) == 0
    assert updater.main(["--check"]) == 0
    fixed = json.loads((tmp_path / "stale.json").read_text())
    assert fixed["expected"]["plan"]["hostname"] == "box.example.org"
    assert fixed["input"] == src["input"]


# --------------------------------------------------------------------------------------------
# Determinism


RICH = {
    "admins": [{"name": "zoe", "ssh_keys": [BOB]}, {"name": "alice", "ssh_keys": [ALICE]}],
    "services": {"web": {"lan_only": True, "sites": [
        {"host": "www", "headers": {"X-B": "2", "X-A": "1"}}, {"host": "@"}, {"host": "blog"}]}},
    "hardening": {
        "ssh": {"port": 2222, "allow_from": ["10.0.0.0/8", "fd00::/8", "192.168.0.0/16"]},
        "firewall": {"extra_ports": [
            {"port": 9100, "reason": "node exporter", "lan_only": True},
            {"port": 51820, "proto": "udp", "reason": "WireGuard"},
            {"port": 8443, "reason": "admin UI"}]},
        "fail2ban": {"ignore": ["192.168.1.0/24", "10.1.0.0/16"]},
        "kernel": {"sysctl_overrides": {"net.ipv4.ip_forward": "1", "kernel.sysrq": "176"}},
    },
}


def _snapshot(plan: Plan) -> str:
    return json.dumps({"data": plan.to_data(), "files": plan.files(), "render": plan.render()},
                      sort_keys=True)


def test_compiling_twice_gives_identical_output() -> None:
    server = validated(model(**RICH))
    a = compile_server(server, Target(release="trixie", keep_open_ports=(22,)))
    b = compile_server(server, Target(release="trixie", keep_open_ports=(22,)))
    assert a.to_data() == b.to_data()
    assert a.files() == b.files()
    assert a.render() == b.render()
    again = validated(model(**RICH))
    assert _snapshot(compile_server(again, Target(release="trixie", keep_open_ports=(22,)))) \
        == _snapshot(a)


def test_order_of_admins_and_extra_ports_in_the_model_does_not_matter() -> None:
    shuffled = copy.deepcopy(RICH)
    shuffled["admins"].reverse()
    shuffled["hardening"]["firewall"]["extra_ports"].reverse()
    a = build(**RICH).files()
    b = build(**shuffled).files()
    for path in (SUDOERS, SSHD_CONFIG, NFTABLES):
        assert a[path] == b[path], path


_HASHSEED_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
from selfhost.compile import Target, compile_server
from selfhost.validation import validated
data = json.loads({data!r})
plan = compile_server(validated(data), Target(release="trixie"))
print(json.dumps({{"data": plan.to_data(), "files": plan.files(), "render": plan.render()}},
                 sort_keys=True))
"""


def test_output_does_not_depend_on_hash_seed() -> None:
    """Set and dict ordering of strings changes with PYTHONHASHSEED; the plan must not.
    Compiles in a subprocess with a fixed seed different from this process's."""
    code = _HASHSEED_SCRIPT.format(root=str(ROOT), data=json.dumps(model(**RICH)))
    seed = "1" if os.environ.get("PYTHONHASHSEED") == "0" else "0"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONHASHSEED": seed}, cwd=ROOT, timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == json.loads(_snapshot(build(Target(release="trixie"),
                                                                **RICH)))


# --------------------------------------------------------------------------------------------
# Firewall


def _accepts_tcp(ruleset: str, port: int) -> bool:
    """Whether some rule of the input chain accepts new TCP connections to ``port``."""
    return any(re.search(rf"\btcp dport {port} accept\b", line) for line in ruleset.splitlines())


@pytest.mark.parametrize("port", [22, 1, 2200, 2222, 65535])
def test_firewall_always_opens_the_ssh_port(port: int) -> None:
    plan = build(hardening={"ssh": {"port": port}})
    ruleset = plan.files()[NFTABLES]
    assert _accepts_tcp(ruleset, port)
    assert f"tcp dport {port} ct state new update @ssh_meter4" in ruleset
    assert "policy drop" in ruleset


@pytest.mark.parametrize("ssh_port", [22, 2222])
def test_firewall_keeps_the_port_in_use_open(ssh_port: int) -> None:
    plan = build(Target(keep_open_ports=(2200,)), hardening={"ssh": {"port": ssh_port}})
    ruleset = plan.files()[NFTABLES]
    assert _accepts_tcp(ruleset, ssh_port)
    assert _accepts_tcp(ruleset, 2200)


def test_firewall_keep_open_port_equal_to_ssh_port_is_not_duplicated() -> None:
    ruleset = build(Target(keep_open_ports=(22,))).files()[NFTABLES]
    assert ruleset == build().files()[NFTABLES]


def test_firewall_ssh_open_even_with_ssh_control_off_and_allow_from() -> None:
    off = build(hardening={"ssh": {"enabled": False, "reason": "managed elsewhere",
                                   "port": 2022}})
    assert _accepts_tcp(off.files()[NFTABLES], 2022)
    limited = build(hardening={"ssh": {"allow_from": ["192.168.1.0/24", "fd00::/8"]}})
    ruleset = limited.files()[NFTABLES]
    assert "ip saddr { 192.168.1.0/24 } tcp dport 22 accept" in ruleset
    assert "ip6 saddr { fd00::/8 } tcp dport 22 accept" in ruleset
    assert 'tcp dport 22 accept comment "ssh"' not in ruleset  # not open to the world


def test_ports_derived_from_web_service() -> None:
    plan = build(**WEB)
    ports = {(p.port, p.proto, p.origin) for p in plan.ports}
    assert ports == {(22, "tcp", "hardening.ssh"), (80, "tcp", "services.web"),
                     (443, "tcp", "services.web"), (443, "udp", "services.web")}
    ruleset = plan.files()[NFTABLES]
    assert 'tcp dport 80 accept comment "web"' in ruleset
    assert 'tcp dport 443 accept comment "web"' in ruleset
    assert 'udp dport 443 accept comment "web"' in ruleset


@pytest.mark.parametrize("services", [{}, {"web": {"enabled": False, "sites": [{"host": "w"}]}}],
                         ids=["no-web", "web-disabled"])
def test_no_web_ports_without_web(services: dict[str, Any]) -> None:
    plan = build(services=services)
    assert [(p.port, p.proto) for p in plan.ports] == [(22, "tcp")]
    ruleset = plan.files()[NFTABLES]
    assert "dport 80 " not in ruleset and "dport 443 " not in ruleset
    assert CADDYFILE not in plan.files()
    packages = next(s for s in plan.steps if isinstance(s, Packages)).names
    assert "caddy" not in packages


def test_lan_only_web_uses_lan_sets() -> None:
    ruleset = build(services={"web": {"lan_only": True, "sites": [{"host": "www"}]}}) \
        .files()[NFTABLES]
    for proto, port in (("tcp", 80), ("tcp", 443), ("udp", 443)):
        assert f'ip saddr @lan4 {proto} dport {port} accept comment "web"' in ruleset
        assert f'ip6 saddr @lan6 {proto} dport {port} accept comment "web"' in ruleset
        assert f"\t{proto} dport {port} accept" not in ruleset  # never from anywhere
    assert "set lan4 { type ipv4_addr; flags interval; elements = { 10.0.0.0/8, " \
           "172.16.0.0/12, 192.168.0.0/16 }; }" in ruleset


def test_lan_only_with_ipv4_lan_only_has_no_ipv6_rule() -> None:
    ruleset = build(services={"web": {"lan_only": True, "sites": [{"host": "www"}]}},
                    hardening={"firewall": {"lan": ["192.168.1.0/24"]}}).files()[NFTABLES]
    assert "ip saddr @lan4 tcp dport 443 accept" in ruleset
    assert "@lan6" not in ruleset and "set lan6" not in ruleset


def test_extra_ports_in_ruleset() -> None:
    ruleset = build(hardening={"firewall": {"extra_ports": [
        {"port": 51820, "proto": "udp", "reason": "WireGuard"},
        {"port": 9100, "reason": "metrics", "lan_only": True}]}}).files()[NFTABLES]
    assert 'udp dport 51820 accept comment "extra: WireGuard"' in ruleset
    assert 'ip saddr @lan4 tcp dport 9100 accept comment "extra: metrics"' in ruleset
    assert "\ttcp dport 9100 accept" not in ruleset


def test_firewall_disabled_writes_no_ruleset() -> None:
    plan = build(hardening={"firewall": {"enabled": False, "reason": "upstream firewall"}})
    assert NFTABLES not in plan.files()
    assert not any(isinstance(s, UnitState) and s.name == "nftables.service"
                   for s in plan.steps)


# --------------------------------------------------------------------------------------------
# sshd


def sshd_settings(text: str) -> dict[str, str]:
    """First value of each keyword (sshd's rule), keywords lowercased."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out.setdefault(key.lower(), value)
    return out


@pytest.mark.parametrize("release", ["bookworm", "trixie"])
def test_pyinfra_can_still_deploy_over_ssh(release: str) -> None:
    """After the first deploy, the admin deploys over SSH with pyinfra, i.e. paramiko: the
    hardened sshd must share a key exchange, cipher, MAC and host key type with it
    (Debian 13's post-quantum-only policy shares no key exchange with paramiko 4.0)."""
    import paramiko

    cfg = sshd_settings(build(Target(release=release)).files()[SSHD_CONFIG])
    t = paramiko.Transport
    client = {"kexalgorithms": t._preferred_kex, "ciphers": t._preferred_ciphers,
              "macs": t._preferred_macs, "hostkeyalgorithms": t._preferred_keys}
    for key, supported in client.items():
        assert set(cfg[key].split(",")) & set(supported), (key, cfg[key], supported)


@pytest.mark.parametrize("release", ["bookworm", "trixie"])
def test_sshd_crypto_is_ssh_audit_policy(release: str) -> None:
    cfg = sshd_settings(build(Target(release=release)).files()[SSHD_CONFIG])
    assert cfg["kexalgorithms"].split(",") == KEX[release]
    weak = re.compile(r"cbc|3des|arcfour|hmac-sha1|hmac-md5|-96|umac-64|ssh-dss|"
                      r"ecdh-sha2|group1-|group14-sha1|^ssh-rsa$")
    for key in ("ciphers", "macs", "hostkeyalgorithms", "kexalgorithms"):
        assert not [a for a in cfg[key].split(",") if weak.search(a)], key
    assert all(m.endswith("-etm@openssh.com") for m in cfg["macs"].split(","))
    assert cfg["requiredrsasize"] == "3072"
    assert f"Debian {'12' if release == 'bookworm' else '13'}" in \
        build(Target(release=release)).files()[SSHD_CONFIG]


def test_sshd_access_settings() -> None:
    cfg = sshd_settings(build(admins=[{"name": "zoe", "ssh_keys": [BOB]},
                                      {"name": "alice", "ssh_keys": [ALICE]}]).files()[SSHD_CONFIG])
    assert cfg["allowusers"] == "alice zoe"
    assert cfg["permitrootlogin"] == "no"
    assert cfg["passwordauthentication"] == "no"
    assert cfg["kbdinteractiveauthentication"] == "no"
    assert cfg["permitemptypasswords"] == "no"
    assert cfg["authenticationmethods"] == "publickey"
    assert cfg["port"] == "22"
    assert cfg["x11forwarding"] == "no"
    assert cfg["allowtcpforwarding"] == "no"


def test_sshd_allow_from_restricts_allow_users_and_port() -> None:
    text = build(hardening={"ssh": {"port": 2222,
                                    "allow_from": ["192.168.1.0/24", "fd00::/8"]}}) \
        .files()[SSHD_CONFIG]
    cfg = sshd_settings(text)
    assert cfg["port"] == "2222"
    assert cfg["allowusers"] == "alice@192.168.1.0/24 alice@fd00::/8"
    # The Include comes last, so drop-ins cannot override the settings above.
    assert text.rstrip().splitlines()[-1] == "Include /etc/ssh/sshd_config.d/*.conf"


def test_sshd_password_authentication_when_asked() -> None:
    cfg = sshd_settings(build(
        admins=[{"name": "alice", "ssh_keys": [ALICE], "password_hash": "$6$salt$abc"}],
        hardening={"ssh": {"password_authentication": True}}).files()[SSHD_CONFIG])
    assert cfg["passwordauthentication"] == "yes"
    assert cfg["permitrootlogin"] == "no"


def test_sshd_control_off_leaves_sshd_config_alone() -> None:
    plan = build(hardening={"ssh": {"enabled": False, "reason": "managed by the provider"}})
    assert SSHD_CONFIG not in plan.files()
    assert not any(isinstance(s, Reload) and s.unit == "ssh.service" for s in plan.steps)


# --------------------------------------------------------------------------------------------
# Caddy


def test_caddyfile_internal_tls_for_private_domain() -> None:
    text = build(domain="home.arpa", **WEB).files()[CADDYFILE]
    assert "www.home.arpa {" in text
    assert "\ttls internal" in text


def test_caddyfile_acme_for_public_domain() -> None:
    text = build(services={"web": {"sites": [{"host": "www"}],
                                   "acme_email": "me@example.org"}}).files()[CADDYFILE]
    assert "www.example.org {" in text
    assert "tls internal" not in text
    assert "\temail me@example.org" in text


def test_caddyfile_tls_mode_can_be_forced() -> None:
    forced = build(services={"web": {"sites": [{"host": "www"}], "tls": "internal"}})
    assert "tls internal" in forced.files()[CADDYFILE]
    acme = build(domain="home.arpa", services={"web": {"sites": [{"host": "www"}],
                                                       "tls": "acme"}})
    assert "tls internal" not in acme.files()[CADDYFILE]


def test_caddyfile_quotes_header_values() -> None:
    text = build(services={"web": {"sites": [
        {"host": "www", "headers": {"X-Test": 'say "hi" \\o/'}}]}}).files()[CADDYFILE]
    assert '\t\tX-Test "say \\"hi\\" \\\\o/"' in text


# --------------------------------------------------------------------------------------------
# Validation of files before they replace the live ones


VALIDATORS = {
    SSHD_CONFIG: "/usr/sbin/sshd -t -f {path}",
    NFTABLES: "nft -c -f {path}",
    CADDYFILE: "caddy validate --adapter caddyfile --config {path}",
    SUDOERS: "visudo -cqf {path}",
}


def _file_steps(plan: Plan) -> dict[str, File]:
    return {s.file.path: s for s in plan.steps if isinstance(s, File)}


def test_critical_files_are_validated() -> None:
    files = _file_steps(build(**WEB))
    for path, validate in VALIDATORS.items():
        assert files[path].file.validate == validate, path
    assert files[JAIL].file.validate is not None
    assert "fail2ban-client" in files[JAIL].file.validate
    for step in files.values():
        if step.file.validate is not None:
            assert "{path}" in step.file.validate, step.file.path


def test_permissions_of_sensitive_files() -> None:
    files = _file_steps(build(**WEB))
    assert files[SUDOERS].file.mode == "0440"
    assert files[SSHD_CONFIG].file.mode == "0600"
    for step in files.values():
        assert (step.file.owner, step.file.group) == ("root", "root"), step.file.path
        assert not int(step.file.mode, 8) & 0o022, f"{step.file.path} is group/world-writable"


def _validated_files(path: Path) -> tuple[str, list[File]]:
    """The release of a fixture's plan and its files that have a ``validate`` command."""
    inp = json.loads(path.read_text())["input"]
    target = updater.target_of(inp)
    plan = compile_server(updater.load_model(inp), target)
    return target.release, [s for s in _file_steps(plan).values() if s.file.validate]


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_rendered_files_pass_their_own_validate_commands(path: Path,
                                                         validators: Validators) -> None:
    """Each rendered file's own check, run for real as the backend runs it on a server: the
    file staged next to its destination, in a container of the plan's Debian release with
    the plan's packages installed (tests/validators.py). No validator may be missing."""
    release, steps = _validated_files(path)
    assert {SSHD_CONFIG, SUDOERS, NFTABLES} <= {s.file.path for s in steps}
    failed = []
    for step in steps:
        assert step.file.validate is not None
        res = validators.check(release, step.file.path, step.file.content, step.file.validate)
        if res.returncode != 0:
            failed.append(f"{step.file.path}: {step.file.validate}\n"
                          f"{(res.stdout + res.stderr).decode(errors='replace')}")
    assert not failed, f"rejected on {release}:\n" + "\n".join(failed)


EXAMPLE_PLANS = [(e, r) for e in EXAMPLES for r in ("bookworm", "trixie")]


@pytest.mark.parametrize("example,release", EXAMPLE_PLANS,
                         ids=[f"{e.stem}-{r}" for e, r in EXAMPLE_PLANS])
def test_example_files_pass_their_own_validate_commands(example: Path, release: str,
                                                        validators: Validators) -> None:
    """The examples' plans (web site, backups to a local and an sftp repository, the
    friend's host) on each release, checked the same way."""
    failed = []
    for plan in updater.example_plans(example, release):
        validators.prepare(release, plan)
        for f in _file_steps(plan).values():
            # Written before jail.local in the same deploy: its check reads them.
            if f.file.path.startswith("/etc/fail2ban/filter.d/"):
                validators.install(release, f.file.path, updater.rendered(f.file))
            # Monit's configuration names programs that must exist (written before it).
            if f.file.path.startswith("/usr/local/sbin/selfhost-monitor"):
                validators.install(release, f.file.path, updater.rendered(f.file), f.file.mode)
        for jail in plan.jails:  # the logs a jail reads exist before it (the web module's
            for log in (jail.logpath or "").split():  # guarded command makes them)
                validators.install(release, log, "")
        steps = [s for s in _file_steps(plan).values() if s.file.validate]
        assert {SSHD_CONFIG, SUDOERS, NFTABLES} <= {s.file.path for s in steps}
        for step in steps:
            assert step.file.validate is not None
            res = validators.check(release, step.file.path, updater.rendered(step.file),
                                   step.file.validate)
            if res.returncode != 0:
                failed.append(f"{plan.host}: {step.file.path}: {step.file.validate}\n"
                              f"{(res.stdout + res.stderr).decode(errors='replace')}")

    assert not failed, f"rejected on {release}:\n" + "\n".join(failed)


def _break(path: str, text: str) -> str:
    """A version of a rendered file that its own validator must reject."""
    if path == NFTABLES:
        assert "policy drop;" in text
        return text.replace("policy drop;", "policy dorp;", 1)
    if path == SSHD_CONFIG:
        return "NoSuchKeyword yes\n" + text
    if path == SUDOERS:
        return text + "alice ALL=(ALL NOPASSWD: ALL\n"
    if path == CADDYFILE:
        return text + "www.example.org {\n"
    if path == JAIL:
        return text + "[sshd]\nenabled = true\nfilter = selfhost-no-such-filter\n"
    if path.endswith(".conf") and "/needrestart/" in path:
        return text + "}\n"
    if path.startswith("/etc/apt/apt.conf.d/"):
        return text + 'APT::Broken "unterminated;\n'
    if path.endswith(".timer"):
        return re.sub(r"(?m)^OnCalendar=.*$", "OnCalendar=every full moon", text)
    if path.startswith("/etc/unbound/"):
        return text + 'server:\n    local-zone: "broken.example." no_such_type\n'
    if path.startswith(("/usr/local/sbin/", "/usr/local/lib/")):
        return text + "\nif then fi\n"
    raise AssertionError(f"no broken version of {path} to check its validator with: add one")


def _one_plan_per_release() -> dict[str, Path]:
    """For each release, the fixture whose plan validates the most files (a web site's)."""
    best: dict[str, tuple[int, Path]] = {}
    for path in FIXTURES:
        release, steps = _validated_files(path)
        if len(steps) > best.get(release, (-1, path))[0]:
            best[release] = (len(steps), path)
    return {release: path for release, (_, path) in sorted(best.items())}


@pytest.mark.parametrize("release", ["bookworm", "trixie"])
def test_each_validator_rejects_a_broken_file(release: str, validators: Validators) -> None:
    """The checks are not no-ops: each validator of a plan refuses a broken version of its
    file on the release it runs on."""
    _, steps = _validated_files(_one_plan_per_release()[release])
    assert CADDYFILE in {s.file.path for s in steps}  # every kind of validator is covered
    accepted = []
    for step in steps:
        assert step.file.validate is not None
        broken = _break(step.file.path, step.file.content)
        res = validators.check(release, step.file.path, broken, step.file.validate)
        if res.returncode == 0:
            accepted.append(f"{step.file.path}: {step.file.validate}")
    assert not accepted, "broken files accepted:\n" + "\n".join(accepted)


def test_validators_are_those_of_the_plan_release(validators: Validators) -> None:
    """Debian 13's sshd_config (ML-KEM key exchange) is refused by Debian 12's sshd: which
    release runs a check matters, so each plan is checked on its own."""
    sshd = _file_steps(build(Target(release="trixie")))[SSHD_CONFIG].file
    assert sshd.validate is not None and "mlkem768x25519-sha256" in sshd.content
    assert validators.check("trixie", sshd.path, sshd.content, sshd.validate).returncode == 0
    res = validators.check("bookworm", sshd.path, sshd.content, sshd.validate)
    assert res.returncode != 0
    assert b"mlkem768x25519-sha256" in res.stderr


# --------------------------------------------------------------------------------------------
# fail2ban, kernel


def _ini(text: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None, strict=True)
    cp.read_string(text)
    return cp


def test_fail2ban_jails() -> None:
    jail = _ini(build(hardening={"ssh": {"port": 2222, "max_auth_tries": 2},
                                 "fail2ban": {"ignore": ["192.168.1.0/24"]}}).files()[JAIL])
    assert jail["DEFAULT"]["backend"] == "systemd"
    assert jail["DEFAULT"]["ignoreip"].split() == ["127.0.0.1/8", "::1", "192.168.1.0/24"]
    assert jail["DEFAULT"]["banaction"].startswith("nftables")
    assert jail["sshd"]["enabled"] == "true"
    assert jail["sshd"]["port"] == "2222"
    assert jail["sshd"]["maxretry"] == "2"
    assert jail["recidive"]["enabled"] == "true"
    assert jail["recidive"]["banaction"] == "nftables-allports"
    assert jail.sections() == ["sshd", "recidive"]


def test_fail2ban_off_writes_no_jails() -> None:
    plan = build(hardening={"fail2ban": {"enabled": False, "reason": "router does it"}})
    assert JAIL not in plan.files()
    packages = next(s for s in plan.steps if isinstance(s, Packages)).names
    assert "fail2ban" not in packages


def _sysctl(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition(" = ")
            out[key] = value
    return out


def test_sysctl_hardened_keys() -> None:
    settings = _sysctl(build().files()[SYSCTL])
    assert settings == HARDENED_SYSCTL
    for key, value in {
        "kernel.kptr_restrict": "2", "kernel.dmesg_restrict": "1",
        "kernel.unprivileged_bpf_disabled": "1", "kernel.yama.ptrace_scope": "1",
        "kernel.kexec_load_disabled": "1", "net.ipv4.tcp_syncookies": "1",
        "net.ipv4.conf.all.rp_filter": "1", "net.ipv4.conf.all.accept_redirects": "0",
        "net.ipv4.conf.all.send_redirects": "0", "net.ipv4.conf.all.accept_source_route": "0",
        "net.ipv4.ip_forward": "0", "fs.protected_symlinks": "1",
        "fs.protected_hardlinks": "1", "fs.suid_dumpable": "0", "kernel.randomize_va_space": "2",
    }.items():
        assert settings[key] == value, key
    assert list(settings) == sorted(settings)


def test_sysctl_override_is_explained() -> None:
    text = build(hardening={"kernel": {"sysctl_overrides": {"net.ipv4.ip_forward": "1"}}}) \
        .files()[SYSCTL]
    assert ("# requested by hardening.kernel.sysctl_overrides.net.ipv4.ip_forward\n"
            "net.ipv4.ip_forward = 1\n") in text
    assert _sysctl(text)["net.ipv4.ip_forward"] == "1"


def test_module_blacklist_never_contains_vfat() -> None:
    text = build().files()[MODPROBE]
    assert "install usb-storage" not in text and "vfat /bin/false" not in text
    for mod in ("cramfs", "dccp", "sctp", "rds", "tipc"):
        assert f"install {mod} /bin/false\nblacklist {mod}\n" in text
    assert "vfat" not in BLACKLIST


def test_kernel_off_writes_no_sysctl() -> None:
    plan = build(hardening={"kernel": {"enabled": False, "reason": "LXC container"}})
    assert SYSCTL not in plan.files() and MODPROBE not in plan.files()
    assert not any(isinstance(s, Run) and SYSCTL in s.command.on_change for s in plan.steps)


# --------------------------------------------------------------------------------------------
# Steps: order and wiring


def test_step_order() -> None:
    plan = build(**WEB)
    kinds = [type(s).__name__ for s in plan.steps]
    assert kinds[0] == "Packages"  # validators (nft, caddy, sshd) exist before files
    last_file = max(i for i, k in enumerate(kinds) if k == "File")
    first_reload = kinds.index("Reload")
    assert last_file < first_reload
    assert all(k == "Reload" for k in kinds[first_reload:])
    first_user = kinds.index("User")
    assert first_user < kinds.index("File")  # sudoers and authorized_keys need the users
    for i, step in enumerate(plan.steps):
        if isinstance(step, Run) and step.command.on_change:
            assert i > last_file, step.command.name


def test_every_reload_and_on_change_refers_to_a_managed_file() -> None:
    plan = build(**WEB)
    files = set(plan.files())
    units = {s.name for s in plan.steps if isinstance(s, UnitState)}
    reloads = [s for s in plan.steps if isinstance(s, Reload)]
    assert {r.unit for r in reloads} >= {"ssh.service", "nftables.service", "caddy.service",
                                          "fail2ban.service"}
    for r in reloads:
        assert r.unit in units
        assert set(r.when) <= files, r
    for s in plan.steps:
        if isinstance(s, Run):
            assert set(s.command.on_change) <= files, s.command.name
    ssh_reload = next(r for r in reloads if r.unit == "ssh.service")
    assert ssh_reload.action == "reload"  # never restart sshd: the session must survive


def test_users_and_sudoers() -> None:
    plan = build(admins=[
        {"name": "zoe", "ssh_keys": [BOB], "password_hash": "$y$j9T$abc$def"},
        {"name": "alice", "ssh_keys": [ALICE]},
        {"name": "max", "ssh_keys": [BOB], "sudo": False}])
    users = [s for s in plan.steps if isinstance(s, User)]
    assert [u.name for u in users] == ["alice", "max", "zoe"]
    assert users[0].groups == ("sudo",) and users[1].groups == ()
    assert users[0].ssh_keys == (ALICE,)
    assert users[2].password_hash == "$y$j9T$abc$def"
    assert plan.files()[SUDOERS].splitlines()[1:] == [
        "Defaults\tignore_dot",
        "Defaults\tumask=0027",
        "alice ALL=(ALL:ALL) NOPASSWD: ALL",
        "zoe ALL=(ALL:ALL) ALL",
    ]


def test_secret_password_hash_is_not_in_the_plan() -> None:
    plan = build(admins=[{"name": "alice", "ssh_keys": [ALICE],
                          "password_hash": {"env": "ALICE_HASH"}}])
    user = next(s for s in plan.steps if isinstance(s, User))
    assert user.password_hash == "secret:env:ALICE_HASH"


def test_render_lists_disabled_controls_with_reasons() -> None:
    plan = build(hardening={
        "fail2ban": {"enabled": False, "reason": "the router bans brute-forcers"},
        "updates": {"enabled": False, "reason": "updates are done by hand on Sundays"}})
    text = plan.render()
    assert "Hardening controls turned OFF:" in text
    assert "  fail2ban: the router bans brute-forcers" in text
    assert "  updates: updates are done by hand on Sundays" in text
    assert plan.disabled_controls[:2] == [("fail2ban", "the router bans brute-forcers"),
                                          ("updates", "updates are done by hand on Sundays")]
    # By default only the documented departures of the accounts control are listed.
    default = build()
    assert {name.split(".")[0] for name, _ in default.disabled_controls} == {"accounts"}
    assert "  accounts.sudo.requiretty: sudo with `requiretty` refuses" in default.render()


def test_example_site_source_resolves_against_the_yaml_directory() -> None:
    plan = compile_server(updater.load_model({"model_file": "examples/home.yaml"}), Target())
    sync = [s for s in plan.steps if type(s).__name__ == "Sync"]
    assert len(sync) == 1
    assert sync[0].src == "examples/site" and sync[0].dest == "/srv/www/www.home.arpa"
    assert (ROOT / sync[0].src / "index.html").is_file()


# --------------------------------------------------------------------------------------------
# Regressions for bugs found by these tests (fixed)


def test_extra_port_reason_with_quote_renders_a_valid_ruleset() -> None:
    from pydantic import ValidationError

    try:
        plan = build(hardening={"firewall": {"extra_ports": [
            {"port": 25565, "reason": 'the "game" server'}]}})
    except ValidationError:
        return  # refusing such a reason is a fine fix too
    line = next(ln for ln in plan.files()[NFTABLES].splitlines() if "dport 25565" in ln)
    assert re.fullmatch(r'\s*tcp dport 25565 accept comment "[^"]*"', line), line


def test_plan_lists_extra_ports_with_their_reason() -> None:
    plan = build(hardening={"firewall": {"extra_ports": [
        {"port": 51820, "proto": "udp", "reason": "WireGuard VPN"}]}})
    assert (51820, "udp") in {(p.port, p.proto) for p in plan.ports}
    assert "51820/udp" in plan.render() and "WireGuard VPN" in plan.render()


def test_plan_lists_no_jails_when_fail2ban_is_off() -> None:
    plan = build(hardening={"fail2ban": {"enabled": False, "reason": "router does it"}})
    assert plan.jails == []


def test_no_cname_at_the_zone_apex() -> None:
    plan = build(services={"web": {"sites": [{"host": "@"}]}})
    assert not [r for r in plan.dns if r.name == "example.org" and r.type == "CNAME"]


def test_lan_only_service_with_no_lan_is_refused() -> None:
    with pytest.raises(ModelError, match=r"for the LAN only, but hardening\.firewall\.lan lists "
                       "no network"):
        validated(model(services={"web": {"lan_only": True, "sites": [{"host": "www"}]}},
                        hardening={"firewall": {"lan": []}}))


# --------------------------------------------------------------------------- time sync

def _time_sync_steps(plan: Plan) -> list[Run]:
    return [s for s in plan.steps if isinstance(s, Run) and s.command.name.startswith(
        "time sync")]


def test_time_sync_installs_timesyncd_only_without_another_time_daemon() -> None:
    [step] = _time_sync_steps(build())
    assert "apt-get -o DPkg::Lock::Timeout=600 install" in step.command.command
    assert "systemd-timesyncd" in step.command.command
    # Never a package of the packages phase: apt would remove a conflicting chrony for it.
    pkgs = next(s for s in build().steps if isinstance(s, Packages))
    assert "systemd-timesyncd" not in pkgs.names
    for daemon in ("chrony", "ntpsec", "openntpd", "systemd-timesyncd"):
        assert daemon in (step.command.unless or "")


def test_time_sync_can_be_turned_off() -> None:
    assert _time_sync_steps(build(time_sync=False)) == []


def _packages(plan: Plan) -> tuple[str, ...]:
    return next(s for s in plan.steps if isinstance(s, Packages)).names


def test_apparmor_on_real_kernels_only() -> None:
    assert "apparmor" in _packages(build(Target("bookworm")))
    assert "apparmor" not in _packages(build(Target("bookworm", in_container=True)))
    off = {"hardening": {"kernel": {"apparmor": False}}}
    assert "apparmor" not in _packages(build(Target("trixie"), **off))


# --------------------------------------------------------------------------------------------
# Accounts: compliance rules applied where auditors read them, departures turned on


def _accounts_run(plan: Plan, name_start: str) -> Run:
    return next(s for s in plan.steps if isinstance(s, Run) and s.source == "hardening.accounts"
                and s.command.name.startswith(name_start))


def test_sudo_defaults_and_departures_turned_on() -> None:
    on = {"enabled": True}
    plan = build(hardening={"accounts": {"sudo": {"requiretty": on, "noexec": on}}})
    assert plan.files()[SUDOERS].splitlines()[1:5] == [
        "Defaults\tignore_dot", "Defaults\tumask=0027", "Defaults\trequiretty",
        "Defaults\tnoexec"]
    off = build(hardening={"accounts": {"enabled": False, "reason": "managed by the company"}})
    assert "Defaults" not in off.files()[SUDOERS]
    assert not [s for s in off.steps if isinstance(s, Run) and "sudoers.d" in s.command.name]


def test_root_password_age_and_hash_cost_follow_the_model() -> None:
    assert not [s for s in build().steps if isinstance(s, Run) and "chage" in s.command.command]
    plan = build(hardening={"accounts": {"root_password_max_age": {"enabled": True},
                                         "password_hash_cost": 11}})
    assert _accounts_run(plan, "root's password").command.command == "chage --maxdays 365 root"
    pam = _accounts_run(plan, "PAM:")
    assert "s/$/ rounds=11/" in pam.command.command and "rounds=11$" in (pam.command.unless or "")
    assert "YESCRYPT_COST_FACTOR\\t11" in _accounts_run(plan, "login.defs").command.command
    assert "accounts.password_hash_cost" not in dict(plan.disabled_controls)


PWQUALITY_DEBIAN = """# Configuration for systemwide password quality limits
# minlen = 8
# dcredit = 0
# enforce_for_root
"""


@pytest.mark.parametrize("composition", [False, True])
def test_pwquality_keys_land_in_pwquality_conf_once(tmp_path: Path, composition: bool) -> None:
    """The command edits Debian's pwquality.conf in place (a real shell): each key once, the
    admin's comments kept, a second run changes nothing and its guard then holds."""
    conf = tmp_path / "pwquality.conf"
    conf.write_text(PWQUALITY_DEBIAN + "minlen = 9\nminlen=10\n")
    dropin = tmp_path / "50-selfhost.conf"
    dropin.write_text("minlen = 14\n")
    plan = build(hardening={"accounts": {"password_composition": {"enabled": True}}}
                 if composition else {})
    run = _accounts_run(plan, "pwquality.conf").command

    def local(cmd: str) -> str:
        return (cmd.replace("/etc/security/pwquality.conf.d/50-selfhost.conf", str(dropin))
                .replace("/etc/security/pwquality.conf", str(conf)))

    guard = ["/bin/sh", "-c", local(run.unless or "")]
    assert subprocess.run(guard, check=False).returncode != 0
    subprocess.run(["/bin/sh", "-c", local(run.command)], check=True)
    first = conf.read_text()
    subprocess.run(["/bin/sh", "-c", local(run.command)], check=True)
    assert conf.read_text() == first and not dropin.exists()
    assert subprocess.run(guard, check=False).returncode == 0
    active = [ln for ln in first.splitlines() if ln and not ln.startswith("#")]
    credit = "-1" if composition else "0"
    assert active == ["minlen = 15", f"minclass = {4 if composition else 3}",
                      f"dcredit = {credit}", f"ucredit = {credit}", f"lcredit = {credit}",
                      f"ocredit = {credit}", "maxrepeat = 3", "dictcheck = 1", "usercheck = 1",
                      "enforce_for_root"]
    assert first.startswith("# Configuration for systemwide")
