"""Model validation: what would lock the owner out, bad names, weak keys, secrets, conflicts,
and the JSON schema editors use."""

from __future__ import annotations

import base64
import copy
import json
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from selfhost.hardening import Hardening
from selfhost.models import Admin, SecretRef, Server
from selfhost.models.ssh_keys import check_public_key
from selfhost.validation import ModelError, validated

INVALID = (ValidationError, ModelError)

KEYS = Path(__file__).resolve().parent / "fixtures" / "keys"
ALICE = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIO15aKF3qdwTP7p24+Rliy7SMGYyMZqFPJES7fSwQd7P "
         "alice@laptop")
RSA_2048 = (KEYS / "rsa2048_weak.pub").read_text().strip()
RSA_3072 = (KEYS / "rsa3072.pub").read_text().strip()
DSA = (KEYS / "dsa.pub").read_text().strip()
ECDSA = (KEYS / "ecdsa_p256.pub").read_text().strip()
BOB = (KEYS / "ed25519_bob.pub").read_text().strip()
YESCRYPT = "$y$j9T$2OSzbtdlTa6ISz.2bH0xL.$o2NQA7yEo0kzGp3Qi1lV1iLKo7Cuy1Jw5u7pDxsZ0c4"
SHA512 = ("$6$rounds=65536$saltsalt$Q8u0Yj8gE8QZtE7y0Xb1m0vQwHh3b7oX2m0M2o0k6sC1Y0QyNnZ0"
          "yM4y0k0ZyQm8Z1p9w3z5R6y0wY9m3Yx1.")


# Benchmark rules selfhost does not apply by default, each with a reason the plan shows.
DEPARTURES = [
    "accounts.password_composition", "accounts.root_password_max_age",
    "accounts.sudo.requiretty", "accounts.sudo.noexec", "accounts.sudo.restricted_rules",
    "accounts.password_hash_cost",
]


def model(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "hostname": "box",
        "domain": "example.org",
        "admins": [{"name": "alice", "ssh_keys": [ALICE]}],
    }
    for k, v in overrides.items():
        data[k] = v
    return copy.deepcopy(data)


def errors(data: dict[str, Any]) -> list[dict[str, Any]]:
    with pytest.raises(INVALID) as exc:
        validated(data)
    return exc.value.errors()


def messages(data: dict[str, Any]) -> str:
    return "\n".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors(data))


def problems(data: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """The (field path, message) pairs of a cross-field `assertions` error."""
    errs = [e for e in errors(data) if e["type"] == "assertions"]
    assert errs, messages(data)
    return [(tuple(loc), msg) for loc, msg in errs[0]["ctx"]["problems"]]


def test_minimal_model_is_valid_and_safe_by_default() -> None:
    server = validated(model())
    assert server.fqdn == "box.example.org"
    assert server.timezone == "UTC"
    h = server.hardening
    # No control is off; only the documented departures from compliance benchmarks are listed.
    assert [name for name, _ in h.disabled()] == DEPARTURES
    assert all(len(reason) > 80 for _, reason in h.disabled())
    assert h.ssh.port == 22 and not h.ssh.password_authentication
    assert not h.ssh.allow_tcp_forwarding and not h.ssh.x11_forwarding
    assert server.services.enabled() == []


def test_unknown_keys_are_errors() -> None:
    errs = errors({**model(), "hostnmae": "typo"})
    assert errs[0]["type"] == "extra_forbidden" and errs[0]["loc"] == ("hostnmae",)
    errs = errors(model(hardening={"ssh": {"prot": 2222}}))
    assert errs[0]["loc"] == ("hardening", "ssh", "prot")


# --------------------------------------------------------------------------------------------
# Lockout


def test_no_admins_refused() -> None:
    errs = errors(model(admins=[]))
    assert [(e["loc"], e["type"]) for e in errs] == [(("admins",), "too_short")]
    assert errors({"hostname": "box", "domain": "example.org"})[0]["type"] == "missing"


def test_admin_without_key_refused_when_password_logins_are_off() -> None:
    found = problems(model(admins=[{"name": "alice"}]))
    assert found == [(("admins", 0, "ssh_keys"),
                      "admin 'alice' has no SSH key and password logins are off: "
                      "they could never log in")]


def test_admin_without_key_accepted_with_password_logins_and_hash() -> None:
    server = validated(model(
        admins=[{"name": "alice", "password_hash": YESCRYPT}],
        hardening={"ssh": {"password_authentication": True}}))
    assert server.admins[0].ssh_keys == []


def test_password_logins_need_a_hash_for_every_admin() -> None:
    found = problems(model(
        admins=[{"name": "alice", "ssh_keys": [ALICE], "password_hash": YESCRYPT},
                {"name": "bob", "ssh_keys": [BOB]}],
        hardening={"ssh": {"password_authentication": True}}))
    assert found == [(("admins", 1, "password"),
                      "password logins are on, so every admin needs a password (or "
                      "password_hash)")]


@pytest.mark.parametrize("name", ["root", "admin", "www-data", "nobody", "sshd", "caddy",
                                  "systemd-network"])
def test_system_account_names_refused(name: str) -> None:
    errs = errors(model(admins=[{"name": name, "ssh_keys": [ALICE]}]))
    assert errs[0]["loc"] == ("admins", 0, "name")
    assert "system account" in errs[0]["msg"]


@pytest.mark.parametrize("name", ["Alice", "1alice", "al ice", "alice!", "a" * 33, ""])
def test_bad_login_names_refused(name: str) -> None:
    assert errors(model(admins=[{"name": name, "ssh_keys": [ALICE]}]))[0]["loc"] == \
        ("admins", 0, "name")


def test_admin_listed_twice_refused() -> None:
    found = problems(model(admins=[{"name": "alice", "ssh_keys": [ALICE]},
                                   {"name": "alice", "ssh_keys": [BOB]}]))
    assert (("admins", 1, "name"), "admin 'alice' is listed twice") in found


def test_at_least_one_admin_with_sudo_required() -> None:
    errors(model(admins=[{"name": "alice", "ssh_keys": [ALICE], "sudo": False}]))


# --------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize("hostname", ["nas", "nas-1", "a", "x" * 63, "0box"])
def test_good_hostnames(hostname: str) -> None:
    assert validated(model(hostname=hostname)).hostname == hostname


@pytest.mark.parametrize("hostname", ["-nas", "nas-", "NAS", "nas.example.org", "na_s",
                                      "x" * 64, "", "nas box"])
def test_bad_hostnames(hostname: str) -> None:
    errs = errors(model(hostname=hostname))
    assert errs[0]["loc"] == ("hostname",)


@pytest.mark.parametrize("domain", ["example.org", "home.arpa", "a.b.c.example", "xn--bcher-kva.ch"])
def test_good_domains(domain: str) -> None:
    assert validated(model(domain=domain)).domain == domain


def test_domain_trailing_dot_is_dropped() -> None:
    assert validated(model(domain="example.org.")).domain == "example.org"


@pytest.mark.parametrize("domain", ["localhost", "example..org", "-x.org", "exa_mple.org",
                                    "Example.org", "192.168.1.10", "example.123", "",
                                    "a." + "b" * 64 + ".org"])
def test_bad_domains(domain: str) -> None:
    errs = errors(model(domain=domain))
    assert errs[0]["loc"] == ("domain",)


def test_timezone() -> None:
    assert validated(model(timezone="Europe/Paris")).timezone == "Europe/Paris"
    errs = errors(model(timezone="Europe/Pariss"))
    assert errs[0]["loc"] == ("timezone",)
    assert "did you mean 'Europe/Paris'" in errs[0]["msg"]
    assert errors(model(timezone="Mars/Olympus_Mons"))[0]["loc"] == ("timezone",)
    assert errors(model(timezone="CEST+1"))[0]["loc"] == ("timezone",)


# --------------------------------------------------------------------------------------------
# SSH keys


def key_error(key: str) -> str:
    errs = errors(model(admins=[{"name": "alice", "ssh_keys": [key]}]))
    assert errs[0]["loc"] == ("admins", 0, "ssh_keys")
    return str(errs[0]["msg"])


def test_weak_rsa_key_refused() -> None:
    assert "RSA key of 2048 bits is too weak" in key_error(RSA_2048)


def test_fresh_ed25519_key_accepted(tmp_path: Path) -> None:
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen not installed")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "me@here",
                    "-f", str(tmp_path / "k")], check=True)
    key = (tmp_path / "k.pub").read_text()
    admin = Admin.model_validate({"name": "alice", "ssh_keys": [key]})
    assert admin.ssh_keys == [key.strip()]


@pytest.mark.parametrize("key", [RSA_3072, ECDSA, BOB, ALICE], ids=["rsa3072", "ecdsa", "ed25519",
                                                                   "example"])
def test_good_keys_accepted(key: str) -> None:
    assert check_public_key(key) == key


def test_key_is_normalised() -> None:
    kind, data, comment = ALICE.split(" ", 2)
    assert check_public_key(f"  {kind}   {data}   {comment}\n") == f"{kind} {data} {comment}"
    assert check_public_key(f"{kind} {data}") == f"{kind} {data}"


def test_dsa_key_refused() -> None:
    assert DSA.startswith("ssh-dss ")
    assert "DSA keys are insecure" in key_error(DSA)


@pytest.mark.parametrize(("key", "message"), [
    ("ssh-ed25519 not*base64!", "not valid base64"),
    ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIO15aKF3qdwTP7p24+Rliy7SMGYyMZqFPJES7fSwQd7", "base64"),
    ("ssh-ed25519 AAAA", "truncated"),
    ("ssh-ed25519", "looks like"),
    ("AAAAC3NzaC1lZDI1NTE5AAAAIO15aKF3qdwTP7p24+Rliy7SMGYyMZqFPJES7fSwQd7P", "looks like"),
    ("ssh-foo AAAA", "unsupported key type"),
    ('from="10.0.0.1" ' + ALICE, "unsupported key type"),
])
def test_malformed_keys_refused(key: str, message: str) -> None:
    assert message in key_error(key)


def test_key_type_must_match_key_data() -> None:
    rsa_data = RSA_3072.split()[1]
    assert "is a 'ssh-rsa' key, not 'ssh-ed25519'" in key_error(f"ssh-ed25519 {rsa_data}")


def test_short_ed25519_key_refused() -> None:
    blob = struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", 16) + b"\0" * 16
    assert "malformed ed25519 key" in key_error(
        "ssh-ed25519 " + base64.b64encode(blob).decode())


def test_duplicate_key_refused() -> None:
    assert "listed twice" in key_error_list([ALICE, ALICE])


def key_error_list(keys: list[str]) -> str:
    errs = errors(model(admins=[{"name": "alice", "ssh_keys": keys}]))
    return str(errs[0]["msg"])


def test_every_bad_key_is_reported_with_its_index() -> None:
    msg = key_error_list([ALICE, RSA_2048, DSA])
    assert "key 1: RSA key of 2048 bits" in msg and "key 2: DSA keys" in msg


# --------------------------------------------------------------------------------------------
# Passwords and secrets


def test_plaintext_password_refused() -> None:
    errs = errors(model(admins=[{"name": "alice", "ssh_keys": [ALICE], "password": "hunter2"}]))
    assert errs[0]["type"] == "plaintext_password"
    assert "password_hash" in errs[0]["msg"]
    assert "hunter2" not in json.dumps(errs[0]["msg"])


@pytest.mark.parametrize("bad", ["hunter2", "$1$salt$abcdefghijklmnopqrstuv", "abJnggxhB/yWI",
                                 "$5$salt$abc", "$y$", "*", "!"])
def test_non_crypt_or_weak_hash_refused(bad: str) -> None:
    errs = errors(model(admins=[{"name": "alice", "ssh_keys": [ALICE], "password_hash": bad}]))
    assert errs[0]["loc"][:3] == ("admins", 0, "password_hash")
    assert "not a strong crypt hash" in str(errs[0]["msg"])


@pytest.mark.parametrize("good", [YESCRYPT, SHA512], ids=["yescrypt", "sha512"])
def test_strong_hash_accepted(good: str) -> None:
    server = validated(model(admins=[{"name": "alice", "ssh_keys": [ALICE],
                                                  "password_hash": good}]))
    assert server.admins[0].password_hash == good


def test_hash_reference_accepted_and_described_without_value() -> None:
    server = validated(model(admins=[{"name": "alice", "ssh_keys": [ALICE],
                                                  "password_hash": {"file": "~/.nas-hash"}}]))
    ref = server.admins[0].password_hash
    assert isinstance(ref, SecretRef)
    assert ref.describe() == "file:~/.nas-hash"


@pytest.mark.parametrize("data", [{}, {"env": "A", "file": "/x"}, {"env": "1BAD"},
                                  {"env": "A", "value": "x"}])
def test_bad_secret_refs(data: dict[str, str]) -> None:
    with pytest.raises(INVALID):
        SecretRef.model_validate(data)


def test_secret_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SELFHOST_TEST_SECRET", "s3cret")
    assert SecretRef(env="SELFHOST_TEST_SECRET").resolve() == "s3cret"
    monkeypatch.delenv("SELFHOST_TEST_SECRET")
    with pytest.raises(LookupError, match="SELFHOST_TEST_SECRET is not set"):
        SecretRef(env="SELFHOST_TEST_SECRET").resolve()
    f = tmp_path / "secret"
    f.write_text("  first line  \nsecond\n")
    assert SecretRef(file=str(f)).resolve() == "first line"
    f.write_text("")
    with pytest.raises(LookupError):
        SecretRef(file=str(f)).resolve()
    with pytest.raises(LookupError):
        SecretRef(file=str(tmp_path / "missing")).resolve()


# --------------------------------------------------------------------------------------------
# Hardening controls


CONTROLS = sorted(Hardening.model_fields)


@pytest.mark.parametrize("control", CONTROLS)
def test_control_off_needs_a_reason(control: str) -> None:
    errs = errors(model(hardening={control: {"enabled": False}}))
    assert errs[0]["loc"] == ("hardening", control)
    assert "requires a `reason`" in errs[0]["msg"]
    assert errors(model(hardening={control: {"enabled": False, "reason": "no"}}))[0]["loc"] == \
        ("hardening", control, "reason")
    server = validated(model(hardening={control: {"enabled": False,
                                                              "reason": "done elsewhere"}}))
    off = server.hardening.disabled()
    assert off[0] == (control, "done elsewhere")
    # Then the departures of the controls still on (none when accounts itself is off).
    assert [name for name, _ in off[1:]] == ([] if control == "accounts" else DEPARTURES)


def test_field_ranges() -> None:
    for bad in ({"ssh": {"port": 0}}, {"ssh": {"port": 65536}}, {"ssh": {"max_auth_tries": 0}},
                {"ssh": {"allow_from": ["not-a-net"]}}, {"updates": {"reboot_time": "25:00"}},
                {"updates": {"scope": "everything"}},
                {"firewall": {"extra_ports": [{"port": 80}]}},  # no reason
                {"firewall": {"extra_ports": [{"port": 80, "proto": "sctp", "reason": "x" * 5}]}}):
        with pytest.raises(INVALID):
            validated(model(hardening=bad))


# --------------------------------------------------------------------------------------------
# Port conflicts


WEB = {"web": {"sites": [{"host": "www"}]}}


@pytest.mark.parametrize(("port", "proto"), [(443, "tcp"), (80, "tcp"), (443, "udp")])
def test_extra_port_conflicting_with_a_service_refused(port: int, proto: str) -> None:
    found = problems(model(services=WEB, hardening={"firewall": {"extra_ports": [
        {"port": port, "proto": proto, "reason": "also https"}]}}))
    assert found == [(("hardening", "firewall", "extra_ports", 0, "port"),
                      f"port {port}/{proto} is requested by both services.web and "
                      "hardening.firewall.extra_ports.0.port")]


def test_extra_port_conflicting_with_ssh_refused() -> None:
    found = problems(model(hardening={"ssh": {"port": 2222}, "firewall": {"extra_ports": [
        {"port": 2222, "reason": "ssh again"}]}}))
    assert found[0][0] == ("hardening", "firewall", "extra_ports", 0, "port")
    assert "hardening.ssh" in found[0][1]


def test_ssh_port_conflicting_with_web_refused() -> None:
    found = problems(model(services=WEB, hardening={"ssh": {"port": 443}}))
    assert found == [(("services", "web"),
                      "port 443/tcp is requested by both hardening.ssh and services.web")]


def test_same_port_other_protocol_or_without_web_is_fine() -> None:
    validated(model(hardening={"firewall": {"extra_ports": [
        {"port": 443, "reason": "https by hand"}, {"port": 22, "proto": "udp", "reason": "mosh?"}]}}))
    validated(model(services={"web": {**WEB["web"], "enabled": False}},
                                hardening={"firewall": {"extra_ports": [
                                    {"port": 443, "reason": "something else"}]}}))


# --------------------------------------------------------------------------------------------
# Web service model


def test_web_site_rules() -> None:
    with pytest.raises(INVALID, match="listed twice"):
        validated(model(services={"web": {"sites": [{"host": "www"},
                                                                 {"host": "WWW"}]}}))
    with pytest.raises(INVALID):
        validated(model(services={"web": {"sites": []}}))
    with pytest.raises(INVALID, match="absolute path"):
        validated(model(services={"web": {"sites": [{"host": "w",
                                                                 "root": "/srv/../etc"}]}}))
    with pytest.raises(INVALID):
        validated(model(services={"web": {"sites": [{"host": "w"}],
                                                      "acme_email": "nope"}}))


# --------------------------------------------------------------------------------------------
# JSON schema


def _missing_descriptions(schema: dict[str, Any]) -> list[str]:
    """Paths of every property, anywhere in the schema, that has no description."""
    missing: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for name, prop in node.get("properties", {}).items():
                if not (isinstance(prop, dict) and prop.get("description")):
                    missing.append(f"{path}.{name}")
            for key, value in node.items():
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(schema, "#")
    return missing


def test_json_schema_generates_and_documents_every_field() -> None:
    schema = Server.model_json_schema()
    json.dumps(schema)  # serialisable as-is
    assert schema["title"] == "Server"
    assert set(schema["required"]) == {"hostname", "domain", "admins"}
    defs = schema["$defs"]
    assert {"Admin", "Hardening", "Services", "WebService", "Site", "SshHardening",
            "FirewallHardening", "ExtraPort", "SecretRef"} <= set(defs)
    assert _missing_descriptions(schema) == []
    # every model has a docstring-derived description too
    assert [name for name, d in defs.items() if not d.get("description")] == []


def test_missing_description_walker_finds_gaps() -> None:
    schema = {"properties": {"a": {"type": "string", "description": "A."}},
              "$defs": {"X": {"properties": {"b": {"type": "int"},
                                             "c": {"anyOf": [], "description": "C."}}}}}
    assert _missing_descriptions(schema) == ["#/$defs/X.b"]


def test_departures_can_be_turned_on_except_restricted_sudo_rules() -> None:
    on = {"enabled": True}
    server = Server.model_validate(model(hardening={"accounts": {
        "password_composition": on, "root_password_max_age": on, "password_hash_cost": 11,
        "sudo": {"requiretty": on, "noexec": on}}}))
    assert [name for name, _ in server.hardening.disabled()] == ["accounts.sudo.restricted_rules"]
    errs = errors(model(hardening={"accounts": {"sudo": {"restricted_rules": on}}}))
    assert errs[0]["loc"] == ("hardening", "accounts", "sudo", "restricted_rules")
    assert "full administrators" in errs[0]["msg"]
    # Turning a departure off again needs a reason of one's own, like any control.
    errs = errors(model(hardening={"accounts": {"sudo": {"noexec": {"enabled": False}}}}))
    assert "requires a `reason`" in errs[0]["msg"]
