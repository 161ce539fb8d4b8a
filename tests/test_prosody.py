"""The XMPP module (Prosody): model rules, what it requests, what it renders per Debian
release, its SCRAM keys, and its account script run for real in a Debian container."""

from __future__ import annotations

import copy
import hashlib
import hmac
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from validators import Validators

from selfhost.backend.pyinfra import _secret_value
from selfhost.compile import Target, compile_fleet
from selfhost.compile.plan import Plan
from selfhost.compose.keys import FakeKeyStore
from selfhost.compose.resources import SecretPiece
from selfhost.models.base import SecretRef
from selfhost.models.fleet import Fleet
from selfhost.models.passwords import saslprep, scram_sha1
from selfhost.services.prosody import ACCOUNTS, ACCOUNTS_SH, CONFIG, data_dir
from selfhost.validation import ModelError, validated

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "xmpp.yaml"
FIXTURES = ROOT / "tests" / "fixtures" / "prosody"
UPDATE = os.environ.get("SELFHOST_UPDATE_FIXTURES") == "1"


def model(**xmpp: Any) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    data["services"]["xmpp"].update(copy.deepcopy(xmpp))
    return data


def plan_of(data: dict[str, Any], release: str = "bookworm") -> Plan:
    [plan] = compile_fleet(Fleet.of(validated(data)),
                           {data["hostname"]: Target(release=release)}).values()  # type: ignore[arg-type]
    return plan


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("release", ["bookworm", "trixie"])
def test_config_of_the_example_is_pinned_per_release(release: str) -> None:
    """The whole prosody.cfg.lua of examples/xmpp.yaml (SELFHOST_UPDATE_FIXTURES=1 rewrites
    the pinned files; review their diff)."""
    text = plan_of(model(), release).files()[CONFIG]
    pinned = FIXTURES / f"{release}.cfg.lua"
    if UPDATE:
        pinned.parent.mkdir(parents=True, exist_ok=True)
        pinned.write_text(text)
    assert text == pinned.read_text()


def test_releases_differ_only_in_their_modules() -> None:
    old = plan_of(model(), "bookworm").files()[CONFIG].splitlines()
    new = plan_of(model(), "trixie").files()[CONFIG].splitlines()
    assert '\t"posix";' in old and '\t"posix";' not in new  # deprecated in 13.0
    assert '\t"account_activity";' in new and '\t"account_activity";' not in old
    differ = set(old) ^ set(new)
    assert differ == {'\t"posix";', '\t"account_activity";', "-- Prosody 0.12 (Debian 12).",
                      "-- Prosody 13.0 (Debian 13)."}


def test_tls_required_no_registration_no_federation_by_default() -> None:
    text = plan_of(model()).files()[CONFIG]
    for line in ("c2s_require_encryption = true", "allow_registration = false",
                 'modules_disabled = { "s2s"; }', 'authentication = "internal_hashed"',
                 'http_interfaces = { "127.0.0.1" }', "https_ports = { }",
                 'VirtualHost "home.arpa"',
                 '\tssl = { certificate = "/etc/selfhost/tls/home.arpa/fullchain.pem"; '
                 'key = "/etc/selfhost/tls/home.arpa/privkey.pem"; }',
                 'Component "conference.home.arpa" "muc"', '\trestrict_room_creation = "local"',
                 'Component "upload.home.arpa" "http_file_share"',
                 "\thttp_file_share_size_limit = 20000000",
                 '\thttp_external_url = "https://upload.home.arpa/"'):
        assert line in text.splitlines(), line
    assert '"register"' not in text and "dialback" not in text and "s2s_ports" not in text


def test_requests_of_the_example() -> None:
    plan = plan_of(model())
    assert [(p.port, p.proto, p.zone) for p in plan.ports if p.origin == "services.xmpp"] == [
        (5222, "tcp", "internet")]
    assert "tcp dport 5222 accept" in plan.files()["/etc/nftables.conf"]
    certs = plan.files()["/etc/selfhost/tls/certificates.txt"]
    assert "home.arpa\tprosody\tprosody.service\n" in certs
    caddy = plan.files()["/etc/caddy/Caddyfile"]
    assert "upload.home.arpa {" in caddy and "reverse_proxy 127.0.0.1:5280" in caddy
    assert "max_size 20MB" in caddy
    [data] = [d for d in plan.data if d.path == "/var/lib/prosody"]
    assert data.stop_units == ("prosody.service",)
    [jail] = [j for j in plan.jails if j.name == "prosody"]
    assert jail.journalmatch == "_SYSTEMD_UNIT=prosody.service" and jail.port == "5222"
    assert "from IP: <HOST>$" in plan.files()["/etc/fail2ban/filter.d/selfhost-prosody-auth.conf"]
    assert ("_xmpp-client._tcp.home.arpa", "SRV", "0 5 5222 nas.home.arpa.") in {
        (r.name, r.type, r.value) for r in plan.dns}
    checks = {(h.kind, h.target) for h in plan.health}
    assert {("unit", "prosody.service"), ("tcp", "127.0.0.1:5222"),
            ("https", "https://upload.home.arpa/"), ("certificate", "home.arpa")} <= checks


def test_federation_opens_5269_and_needs_certificates_of_every_host() -> None:
    data = model(domains=["example.org"], federation=True,
                 accounts=[{"jid": "alice@example.org", "password": {"env": "A"}}])
    plan = plan_of(data, "trixie")
    text = plan.files()[CONFIG]
    assert "modules_disabled = { }" in text and "s2s_ports = { 5269 }" in text
    assert '\t"dialback";' in text and '\t"cloud_notify";' in text
    assert 'ssl = { certificate = "/etc/selfhost/tls/conference.example.org/fullchain.pem"' \
        in text
    assert (5269, "internet") in {(p.port, p.zone) for p in plan.ports}
    certs = plan.files()["/etc/selfhost/tls/certificates.txt"]
    for name in ("example.org", "conference.example.org", "upload.example.org"):
        assert f"{name}\tprosody\tprosody.service\n" in certs
    records = {(r.name, r.type, r.value) for r in plan.dns}
    assert ("_xmpp-server._tcp.example.org", "SRV", "0 5 5269 nas.home.arpa.") in records
    assert ("conference.example.org", "CNAME", "nas.home.arpa.") in records


def test_without_upload_and_muc_only_the_domain() -> None:
    plan = plan_of(model(upload_max_mb=0, muc=False, zone="lan"))
    text = plan.files()[CONFIG]
    assert "Component" not in text
    assert "upload.home.arpa" not in plan.files().get("/etc/caddy/Caddyfile", "")
    assert (5222, "lan") in {(p.port, p.zone) for p in plan.ports}


def test_accounts_list_holds_markers_only() -> None:
    plan = plan_of(model())
    [step] = [s for s in plan.steps if getattr(s, "file", None) is not None
              and s.file.path == ACCOUNTS]  # type: ignore[attr-defined]
    f = step.file  # type: ignore[attr-defined]
    assert f.mode == "0600" and f.owner == "root"
    assert f.content.splitlines()[2:] == [
        "domain\t/var/lib/prosody/home%2earpa/accounts",
        "account\t/var/lib/prosody/home%2earpa/accounts/alice.dat\t@@selfhost-secret-0@@",
        "account\t/var/lib/prosody/home%2earpa/accounts/bob.dat\t@@selfhost-secret-1@@"]
    assert [(p.ref.env, p.transform) for p in f.secrets] == [
        ("XMPP_ALICE_PASSWORD", "scram-sha-1"), ("XMPP_BOB_PASSWORD", "scram-sha-1")]
    commands = {s.command.name: s.command for s in plan.steps if hasattr(s, "command")}
    changed = commands["prosody: account files from the model (the list changed)"]
    drift = commands["prosody: account files match the model"]
    assert ACCOUNTS in changed.on_change and drift.unless is not None
    assert drift.unless.endswith("--check")


def test_data_dir_encodes_like_prosody() -> None:
    assert data_dir("home.arpa") == "/var/lib/prosody/home%2earpa"
    assert data_dir("my-chat.example.org") == "/var/lib/prosody/my%2dchat%2eexample%2eorg"


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("accounts,message", [
    ([{"jid": "alice@example.org", "password": {"env": "A"}}],
     r"services\.xmpp\.accounts\.0\.jid: alice@example\.org: example\.org is not one of the "
     r"XMPP domains \(home\.arpa\)"),
    ([{"jid": "alice@home.arpa", "password": {"env": "A"}},
      {"jid": "alice@home.arpa", "password": {"env": "B"}}],
     r"services\.xmpp\.accounts\.1\.jid: alice@home\.arpa is listed twice"),
])
def test_accounts_are_checked_at_their_model_path(accounts: list[dict[str, Any]],
                                                 message: str) -> None:
    with pytest.raises(ModelError, match=message):
        validated(model(accounts=accounts))


@pytest.mark.parametrize("jid", ["alice", "alice@", "@home.arpa", "Alice@home.arpa",
                                 "al ice@home.arpa", "alice@home", "alice@home.arpa/phone",
                                 "a@b@home.arpa", "alice@-home.arpa"])
def test_malformed_jids_are_refused(jid: str) -> None:
    with pytest.raises(ValidationError, match="is not a JID of the form name@domain") as e:
        validated(model(accounts=[{"jid": jid, "password": {"env": "A"}}]))
    assert e.value.errors()[0]["loc"][-4:] == ("xmpp", "accounts", 0, "jid")


def test_domains_and_federation_rules() -> None:
    with pytest.raises(ValidationError, match="domains listed twice"):
        validated(model(domains=["home.arpa", "home.arpa"]))
    with pytest.raises(ValidationError, match=r"conference\.home\.arpa is both a domain"):
        validated(model(domains=["home.arpa", "conference.home.arpa"]))
    with pytest.raises(ModelError, match=r"services\.xmpp\.federation: federation needs "
                       r"public domains: home\.arpa"):
        validated(model(federation=True))
    with pytest.raises(ValidationError):
        validated(model(accounts=[]))


def test_upload_host_conflicts_with_a_site_of_the_same_name() -> None:
    data = model()
    data["services"]["web"] = {"sites": [{"host": "upload"}]}
    with pytest.raises(ModelError, match=r"virtual host upload\.home\.arpa"):
        validated(data)


# --------------------------------------------------------------------------- SCRAM keys


def test_scram_keys_match_prosodys_own_computation() -> None:
    """Computed by Prosody 0.12 and 13.0 (util.sasl.scram getAuthenticationDatabaseSHA1 with
    lua5.4 in Debian 12 and 13), SASLprep mapping the no-break space included."""
    assert scram_sha1("p\u00e9ncil \u00a0x", "0123abcd") == (
        "6b115fd7ab4e2c3bb9094796b5ed53d712bcef41", "745f3a28301e720b56045f0a6389fb935456512c")


def test_saslprep() -> None:
    assert saslprep("I\u00adX") == "IX"  # soft hyphen mapped to nothing
    assert saslprep("\u2168") == "IX"  # NFKC
    for bad in ("a\u0007b", "\u0627" + "1"):
        with pytest.raises(ValueError):
            saslprep(bad)


def test_scram_secret_is_deterministic_and_salted_per_account(monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    monkeypatch.setenv("XMPP_TEST_PW", "correct horse battery staple")
    keys = FakeKeyStore()
    ref = SecretRef(env="XMPP_TEST_PW")
    one = _secret_value(SecretPiece(ref, "scram-sha-1", "xmpp/nas/alice@a.org"), keys)
    again = _secret_value(SecretPiece(ref, "scram-sha-1", "xmpp/nas/alice@a.org"), keys)
    other = _secret_value(SecretPiece(ref, "scram-sha-1", "xmpp/nas/bob@a.org"), keys)
    assert one == again
    iterations, salt, stored, server = one.split("\t")
    assert iterations == "10000" and len(salt) == 32 and salt != other.split("\t")[1]
    expected_salt = hmac.new(keys.salt_key(), b"xmpp/nas/alice@a.org\0correct horse battery "
                             b"staple", "sha256").hexdigest()[:32]
    assert salt == expected_salt
    salted = hashlib.pbkdf2_hmac("sha1", b"correct horse battery staple", salt.encode(), 10000)
    assert server == hmac.new(salted, b"Server Key", "sha1").hexdigest()
    assert stored == hashlib.sha1(hmac.new(salted, b"Client Key", "sha1").digest()).hexdigest()
    assert "correct horse" not in one


# --------------------------------------------------------------------------- on Debian


@pytest.mark.parametrize("release", ["bookworm", "trixie"])
def test_validator_refuses_a_broken_config(release: str, validators: Validators) -> None:
    text = plan_of(model(), release).files()[CONFIG]
    [validate] = [s.file.validate for s in plan_of(model(), release).steps  # type: ignore[attr-defined]
                  if getattr(s, "file", None) is not None and s.file.path == CONFIG]
    assert validate is not None
    assert validators.check(release, CONFIG, text, validate).returncode == 0
    res = validators.check(release, CONFIG, text + 'VirtualHost "broken.example" {\n', validate)
    assert res.returncode != 0 and b"unexpected symbol" in res.stdout + res.stderr


def test_accounts_script_writes_checks_and_removes(validators: Validators) -> None:
    """The script on Debian 13 with Debian's prosody user: it writes the account files in
    Prosody's format, --check then passes, a changed key or an extra account is drift, and
    an account no longer listed is removed (but not another domain's)."""
    d = data_dir("home.arpa") + "/accounts"
    other = data_dir("other.org") + "/accounts"
    line = f"account\t{d}/alice.dat\t10000\tsalt1\tstored1\tserver1\n"
    script = ("cat > /tmp/script && " + "printf '%s' \"$LIST\" > /tmp/list && "
              "export SELFHOST_PROSODY_ACCOUNTS=/tmp/list && ")

    def run(list_text: str, cmd: str) -> tuple[int, str]:
        res = validators.run("trixie", f"LIST={_q(list_text)}; " + script + cmd, ACCOUNTS_SH)
        return res.returncode, (res.stdout + res.stderr).decode()

    listed = f"# comment\ndomain\t{d}\n{line}"
    setup = f"rm -rf {d} {other} && install -d -o prosody {other} && touch {other}/x.dat && "
    rc, out = run(listed, setup + "bash /tmp/script --check")
    assert rc == 1  # nothing written yet
    rc, out = run(listed, setup + f"bash /tmp/script && bash /tmp/script --check && "
                  f"stat -c '%U:%G:%a' {d}/alice.dat && cat {d}/alice.dat")
    assert rc == 0, out
    assert "prosody:prosody:640\nreturn {\n\t[\"iteration_count\"] = 10000;\n\t[\"salt\"] = " \
        "\"salt1\";\n\t[\"server_key\"] = \"server1\";\n\t[\"stored_key\"] = \"stored1\";\n};" in out
    rc, _ = run(listed.replace("stored1", "stored2"), "bash /tmp/script --check")
    assert rc == 1
    rc, _ = run(listed, f"touch {d}/mallory.dat && bash /tmp/script --check")
    assert rc == 1
    rc, out = run(listed, f"bash /tmp/script && ls {d} {other}")
    assert rc == 0 and "mallory.dat removed" in out and "mallory.dat\n" not in out.split(
        "removed")[-1] and "x.dat" in out
    rc, out = run(f"domain\t{d}\n", f"bash /tmp/script && ls -A {d}")
    assert rc == 0 and "alice.dat removed" in out


def _q(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"
