"""Hostile input (issue 15): no string of the model can add a line or a directive to a
generated file, and no YAML text makes `selfhost validate` crash.

Property-based (Hypothesis). The model under attack is a rich server description using every
module (admins with keys and password references, every hardening control, a web site with
headers, notify, four kinds of backup repository). One string of it (a value or a mapping
key, anywhere) is replaced by a hostile one; the result must either be refused with a located
`FILE:LINE:COL: path: message` issue, or compile into a plan whose every generated text (each
file, each authorized_keys, each shell command, the plan listing) has exactly as many lines as
the untouched model's, and holds no control character but line feeds and tabs.
"""

from __future__ import annotations

import copy
import json
import re
import resource
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

from selfhost.cli import main
from selfhost.compile import Target, compile_server
from selfhost.compile.plan import File, Plan, Run, User
from selfhost.config import ConfigError, load_server_text
from selfhost.hardening.audit import ISSUE, ISSUE_NET
from selfhost.models.base import StrictModel, find_control
from selfhost.models.server import Admin, Server

KEY1 = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAcDUnIB8pafK5YzOjFNMxx3cvqHL0AlzF6hjAr0j8sw "
        "alice@laptop")
KEY2 = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJHFuxSYHsSL7YwiPRWcEsB3Pfq9nlbn62da2yu10MDh "
        "bob@desktop")
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJHFuxSYHsSL7YwiPRWcEsB3Pfq9nlbn62da2yu10MDh"

RICH: dict[str, Any] = {
    "hostname": "nas",
    "domain": "example.org",
    "addresses": {"lan": ["192.168.1.10"], "vpn": ["10.8.0.1"]},
    "timezone": "Europe/Paris",
    "admins": [
        {"name": "alice", "ssh_keys": [KEY1, KEY2], "password": {"env": "H15_NO_SUCH_VAR"}},
        {"name": "carol", "sudo": False, "ssh_keys": [KEY2],
         "password_hash": {"file": "/nonexistent/carol-hash"}},
    ],
    "hardening": {
        "ssh": {"port": 2222, "allow_from": ["192.168.1.0/24", "fd00::/8"]},
        "firewall": {"extra_ports": [{"port": 51820, "proto": "udp",
                                      "reason": "WireGuard, by hand", "lan_only": True}],
                     "lan": ["192.168.1.0/24"]},
        "fail2ban": {"ignore": ["192.168.1.0/24"]},
        "updates": {"reboot_time": "03:30"},
        "kernel": {"enabled": False, "reason": "tuned by the hosting provider"},
        "audit": {"banner": "Authorized use only.\nEverything is logged."},
    },
    "services": {"web": {
        "tls": "acme", "acme_email": "admin@example.org",
        "sites": [
            {"host": "www", "root": "/srv/www/example",
             "headers": {"Cache-Control": "max-age=3600",
                         "Content-Security-Policy": "default-src 'self'"}},
            {"host": "@", "source": "site"},
        ],
    },
        "radicale": {"host": "dav", "users": [{"name": "alice",
                                                "password": {"env": "H15_DAV"}}]},
        "wireguard": {"endpoint": "home.example.org", "network": "10.8.0.0/24", "port": 51821,
                      "peers": [{"name": "laptop", "address": "10.8.0.2",
                                 "public_key": "8joRWeW8o0h8ONm9TZWXsY28C0wIAwzD6o2cZfhP4mg="}]},
        "monitoring": {"paths": ["/srv"]},
        "resolver": {"blocklist": ["ads.example.com"]},
        # Its own domain, which no site serves: the web server then always holds its
        # certificate with a block of its own (a site named like it would drop that block).
        "xmpp": {"domains": ["chat.example.org"],
                 "accounts": [{"jid": "alice@chat.example.org",
                               "password": {"env": "H15_XMPP"}}]},
        "samba": {"users": [{"name": "carol", "password": {"env": "H15_SMB"}}],
                  "shares": [{"name": "family", "comment": "Photos", "valid_users": ["carol"],
                              "write_list": ["carol"]}]},
        "association": {"plans": {"site+db": {"php": True, "databases": 1}},
                        "members": [{"name": "dora", "email": "dora@example.org",
                                     "plan": "site+db",
                                     "sites": [{"domain": "dora.example.org", "php": True}],
                                     "databases": ["dora_site"],
                                     "database_password": {"env": "H15_DB"}}]},
        "sync": {"users": [{"name": "dave", "devices": [
            {"name": "laptop", "id": "MFZWI3D-BONSGYC-YLTMRWG-C43ENR5-QXGZDMM-FZWI3DP-BONSGYY-LTMRWAD",
             "addresses": ["tcp://laptop.example.org:22000"]}],
            "folders": [{"id": "docs", "label": "My documents", "devices": ["laptop"]}]}]},
    },
    "notify": {"email": "alice@example.org", "sender": "nas@example.org",
               "smtp": {"host": "smtp.example.org", "user": "nas@example.org",
                        "password": {"env": "H15_SMTP"}}},
    "backup": {
        "repositories": [
            {"name": "usb", "type": "local", "password": {"file": "/nonexistent/usb"},
             "path": "/mnt/usb/restic", "schedule": "*-*-* 02:30",
             "retention": {"keep_within": "2d", "daily": 3}},
            {"name": "far", "type": "sftp", "password": {"env": "H15_FAR"},
             "host": "backup.example.net", "user": "nas", "path": "restic/nas",
             "host_key": HOST_KEY},
            {"name": "rest", "type": "rest", "password": {"env": "H15_REST"},
             "url": "https://backup.example.net:8000/nas/", "rest_user": "nas",
             "rest_password": {"env": "H15_REST_HTTP"}},
            {"name": "cloud", "type": "rclone", "password": {"env": "H15_CLOUD"},
             "remote": "b2:bucket/nas"},
        ],
        "extra_paths": ["/home", "/etc/important"],
        "exclude": ["*.tmp", "/home/*/.cache"],
    },
}

# Control characters and other hostile text: every C0 and C1 control, DEL, the Unicode line
# separators, lone surrogates; and what a directive injection looks like in each format.
CONTROL = [chr(c) for c in [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, 0xD800, 0xDFFF]]
PAYLOADS = [
    "\nPermitRootLogin yes", "\r\nAllowUsers root", "\n}\n:8080 {\n\trespond 200\n}",
    "\n\t\ttcp dport 23 accept", "\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA evil",
    '" ; reboot ; "', "'; reboot; '", "$(reboot)", "`reboot`", "\\", '"', "{", "}", "#",
    "\x00", "\u2028evil", "\x85", "\x1b[2J", "a" * 300,
]

hostile_text = st.one_of(
    st.sampled_from(PAYLOADS),
    st.text(alphabet=st.sampled_from(CONTROL), min_size=1, max_size=3),
    st.text(max_size=20),  # any code point, surrogates included
)


def string_paths(node: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], bool]]:
    """(path, is_key) for every string value and every mapping key of ``node``."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield (*at, k), True
            yield from string_paths(v, (*at, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from string_paths(v, (*at, i))
    elif isinstance(node, str):
        yield at, False


STRING_PATHS = list(string_paths(RICH))


def mutate(data: dict[str, Any], path: tuple[Any, ...], is_key: bool, how: str,
           text: str, where: int) -> dict[str, Any]:
    out = copy.deepcopy(data)
    parent: Any = out
    for seg in path[:-1]:
        parent = parent[seg]
    last = path[-1]
    old = last if is_key else parent[last]
    i = min(where, len(old))
    new = {"replace": text, "insert": old[:i] + text + old[i:], "append": old + text}[how]
    if is_key:
        if new in parent:
            return out
        parent[new] = parent.pop(last)
    else:
        parent[last] = new
    return out


def value_at(data: Any, path: tuple[Any, ...]) -> Any:
    for seg in path:
        data = data[seg]
    return data


def flips_publicity(old: Any, new: Any) -> bool:
    """Whether a mutated value is a name whose public or private status changed."""
    from selfhost.services.web import is_public_domain

    if not (isinstance(old, str) and isinstance(new, str)):
        return False
    try:
        return bool(is_public_domain(old.lower().rstrip("."))
                    != is_public_domain(new.lower().rstrip(".")))
    except (ValueError, UnicodeError):
        return False


def referenced(old: Any) -> bool:
    """Whether a value is a name that another field of the rich model repeats (the admin
    carol is also a Samba user): changing one side turns a cross-reference on or off, which
    decides plan steps (a Samba user who is an admin gets the admin's account)."""
    return isinstance(old, str) and sum(1 for p, is_key in STRING_PATHS
                                        if not is_key and value_at(RICH, p) == old) > 1


def to_yaml(data: dict[str, Any]) -> str:
    # JSON is YAML (1.2): every character, control or surrogate, travels as a \u escape.
    return json.dumps(data, ensure_ascii=True)


def artifacts(plan: Plan) -> dict[str, str]:
    """Every text the deploy writes or runs, by a stable name."""
    out: dict[str, str] = {"plan": plan.render()}
    runs = 0
    for step in plan.steps:
        if isinstance(step, File):
            out[step.file.path] = step.file.content
        elif isinstance(step, User):
            out[f"~{step.name}/.ssh/authorized_keys"] = "".join(k + "\n" for k in step.ssh_keys)
        elif isinstance(step, Run):
            runs += 1
            cmd = step.command
            out[f"run {runs}"] = f"{cmd.name}\n{cmd.command}\n{cmd.unless or ''}"
    return out


BAD_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
TARGET = Target(release="trixie")
BASELINE = artifacts(compile_server(load_server_text(to_yaml(RICH), "rich.yaml"), TARGET))


def line_count(text: str) -> int:
    return text.count("\n")


def test_the_rich_model_uses_every_module() -> None:
    server = load_server_text(to_yaml(RICH), "rich.yaml")
    assert server.notify is not None and server.services.web is not None
    # Every service of the catalog is in it: a new module gets attacked too.
    from selfhost.services import Services

    # Two are left out: Knot's authoritative `dns` (the LAN resolver owns port 53 here) and
    # `mail` (its Postfix takes the sendmail role, and msmtp's file, which notify's strings
    # reach, would no longer be rendered), and `lists` (Mailman needs the mail service). Not
    # attacked yet: a second rich model is owed.
    assert [name for name in Services.model_fields
            if getattr(server.services, name) is None] == ["dns", "mail", "lists"]
    assert {r.type for r in server.backup.repositories} == {"local", "sftp", "rest", "rclone"}
    assert len(STRING_PATHS) > 80
    assert "/etc/caddy/Caddyfile" in BASELINE and "/etc/msmtprc" in BASELINE
    assert "/etc/nftables.conf" in BASELINE and "/etc/ssh/sshd_config" in BASELINE


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(target=st.sampled_from(STRING_PATHS), how=st.sampled_from(["replace", "insert", "append"]),
       text=hostile_text, where=st.integers(0, 40))
# Found by Hypothesis: the admin carol renamed is no longer also the Samba user carol.
@example(target=(("admins", 1, "name"), False), how="replace", text="_", where=0)
def test_a_hostile_string_is_refused_with_a_location_or_adds_no_line(
        target: tuple[tuple[Any, ...], bool], how: str, text: str, where: int) -> None:
    path, is_key = target
    data = mutate(RICH, path, is_key, how, text, where)
    try:
        server = load_server_text(to_yaml(data), "rich.yaml")
    except ConfigError as exc:
        event("refused")
        for issue in exc.issues:
            assert issue.line >= 1 and issue.col >= 1 and issue.path
            assert not BAD_CHARS.search(issue.format()) and "\n" not in issue.format()
        # A control character is always reported at the field (or key) that holds it.
        if find_control(text) is not None and find_control(data) is not None:
            # (a renamed key is reported under its mapping, as an unknown key or a bad one)
            field = ".".join(str(p) for p in path[:min(2, len(path) - 1 if is_key else 2)])
            assert any(i.path.startswith(field) or i.path == "(root)" for i in exc.issues), \
                [i.format() for i in exc.issues]
        return
    try:
        plan = compile_server(server, TARGET)
    except ValueError:  # two writers of one file (e.g. a root that collides): not an injection
        return
    event("compiled")
    got = artifacts(plan)
    multiline = path[:3] == ("hardening", "audit", "banner")
    # A site's host decides whether the plan lists a CNAME for it (the apex '@' has none), and
    # a name that turns from private to public (example.org into 0example.org) or back
    # decides which DNS records and certificates the plan lists; so does a name that another
    # field repeats (a cross-reference, made or broken).
    shapes_plan = (path[:3] == ("services", "web", "sites") and path[-1] == "host") or (
        not is_key and (flips_publicity(value_at(RICH, path), value_at(data, path))
                        or referenced(value_at(RICH, path))))
    for name, text_out in got.items():
        assert not BAD_CHARS.search(text_out), (name, text_out)
        if multiline and name in (ISSUE, ISSUE_NET, "plan"):
            continue
        if shapes_plan and name == "plan":
            continue
        if name in BASELINE:
            assert line_count(text_out) == line_count(BASELINE[name]), (name, text_out)


# --------------------------------------------------------------------------- per format
# The generic property above says "no line added"; these say the value lands where it belongs.


def _server(**changes: Any) -> Server:
    data = copy.deepcopy(RICH)
    for dotted, value in changes.items():
        node: Any = data
        *head, last = dotted.split("__")
        for seg in head:
            node = node[int(seg) if seg.isdigit() else seg]
        node[int(last) if last.isdigit() else last] = value
    return load_server_text(to_yaml(data), "rich.yaml")


printable = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp")),
                    min_size=1, max_size=30)


def _unquote_caddy(token: str) -> str:
    assert token.startswith('"') and token.endswith('"'), token
    return re.sub(r"\\(.)", r"\1", token[1:-1])


@settings(max_examples=150, deadline=None)
@given(value=printable)
def test_a_header_value_is_exactly_one_caddyfile_line(value: str) -> None:
    try:
        server = _server(services__web__sites__0__headers={
            "Cache-Control": "max-age=3600", "X-Test": value})
    except ConfigError:
        return
    caddy = artifacts(compile_server(server, TARGET))["/etc/caddy/Caddyfile"]
    lines = [ln for ln in caddy.splitlines() if ln.startswith("\t\tX-Test ")]
    assert len(lines) == 1
    assert _unquote_caddy(lines[0][len("\t\tX-Test "):]) == value.strip()
    assert line_count(caddy) == line_count(BASELINE["/etc/caddy/Caddyfile"])


@settings(max_examples=150, deadline=None)
@given(comment=printable)
def test_an_ssh_key_comment_stays_on_its_authorized_keys_line(comment: str) -> None:
    key = KEY1.rsplit(" ", 1)[0] + " " + comment
    try:
        server = _server(admins__0__ssh_keys=[key, KEY2])
    except ConfigError:
        return
    keys = artifacts(compile_server(server, TARGET))["~alice/.ssh/authorized_keys"]
    lines = keys.splitlines()
    assert len(lines) == 2
    kind, data, _ = KEY1.split(" ")
    # The key as the model holds it (type, data, the comment without its outer blanks).
    assert lines[0] == server.admins[0].ssh_keys[0]
    # (sshd splits a line on spaces and tabs only: a no-break space belongs to the comment)
    assert lines[0] == f"{kind} {data} {comment.lstrip(' ' + chr(9))}".rstrip()
    assert lines[1] == KEY2


@settings(max_examples=100, deadline=None)
@given(reason=printable)
def test_an_extra_port_reason_is_one_nftables_comment(reason: str) -> None:
    try:
        server = _server(hardening__firewall__extra_ports=[
            {"port": 51820, "proto": "udp", "reason": reason}])
    except ConfigError:
        return
    nft = artifacts(compile_server(server, TARGET))["/etc/nftables.conf"]
    rules = [ln for ln in nft.splitlines() if "dport 51820" in ln]
    assert len(rules) == 1 and rules[0].count('"') == 2
    assert line_count(nft) == line_count(BASELINE["/etc/nftables.conf"])


# --------------------------------------------------------------------------- the Python API


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(CONTROL), min_size=1, max_size=2),
       prefix=st.text(max_size=5))
def test_the_models_refuse_control_characters_without_the_yaml_loader(
        text: str, prefix: str) -> None:
    # Built in Python, the YAML loader's checks are bypassed: the models themselves refuse.
    admin = Admin(name="alice", ssh_keys=[KEY1])
    value = f"{prefix}x{text}y"
    with pytest.raises(ValueError, match=r"control character|valid string"):
        Admin(name="alice", ssh_keys=[f"{KEY1}{value}"])
    with pytest.raises(ValueError, match=r"control character|valid string"):
        admin.ssh_keys = [KEY1 + " " + value]


def test_every_model_is_a_strict_model() -> None:
    # The control-character check lives in StrictModel: a model outside it would escape it.
    from pydantic import BaseModel

    def walk(model: type[BaseModel], seen: set[type[BaseModel]]) -> None:
        if model in seen:
            return
        seen.add(model)
        assert issubclass(model, StrictModel), model
        for f in model.model_fields.values():
            for t in _types(f.annotation):
                if isinstance(t, type) and issubclass(t, BaseModel):
                    walk(t, seen)

    seen: set[type[BaseModel]] = set()
    walk(Server, seen)
    assert len(seen) > 15


def _types(tp: Any) -> Iterator[Any]:
    from typing import get_args

    yield tp
    for arg in get_args(tp):
        yield from _types(arg)


# --------------------------------------------------------------------------- random YAML


MINIMAL = (f"hostname: nas\ndomain: home.arpa\nadmins:\n  - name: alice\n"
           f"    ssh_keys: ['{KEY1}']\nhardening:\n  ssh: {{port: 2222}}\n")
YAML_BITS = [":", "- ", "? ", "&a ", "*a", "!!str ", "!!binary ", "!foo ", "<<: ", "{", "}",
             "[", "]", ",", "'", '"', "#", "|", ">", "---\n", "...\n", "\n", "  ", "\t", "%YAML",
             "~", "null", "0x1F", "1e9", ".inf", "yes", "\\", "\u2028", "\x85", "\ufeff", "@", "`"]


def _validate(tmp_path: Any, text: str | bytes, capsys: Any) -> tuple[int, str, float, int]:
    path = tmp_path / "f.yaml"
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
    else:
        path.write_bytes(text)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    status = main(["validate", str(path)])
    elapsed = time.perf_counter() - start
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    out = capsys.readouterr()
    return status, out.out + out.err, elapsed, grown


# Pydantic's default messages, which speak of its types rather than of the YAML file.
PYDANTIC_WORDS = re.compile(r"Input should|String should|List should|Value should|instance of|"
                            r"Value error|validation error|Field required|type=")


def _check_validate_result(status: int, output: str, elapsed: float, grown_kib: int) -> None:
    assert status in (0, 2), output
    assert "Traceback" not in output and "internal error" not in output, output
    assert elapsed < 2.0, f"{elapsed:.2f} s"
    assert grown_kib < 64 * 1024, f"max RSS grew by {grown_kib} KiB"
    for line in output.splitlines():
        assert re.match(r"^.+:(\d+:\d+: .+: .+| ok)$", line), line
        assert not PYDANTIC_WORDS.search(line), line


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(cuts=st.lists(st.tuples(st.integers(0, len(MINIMAL)), st.integers(0, 8),
                               st.sampled_from(YAML_BITS)), min_size=1, max_size=6))
def test_validate_survives_mutated_yaml(tmp_path: Any, capsys: Any,
                                        cuts: list[tuple[int, int, str]]) -> None:
    text = MINIMAL
    for at, drop, bit in cuts:
        at = min(at, len(text))
        text = text[:at] + bit + text[at + drop:]
    _check_validate_result(*_validate(tmp_path, text, capsys)[:4])


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200),
                      st.lists(st.sampled_from([*YAML_BITS, "a", "b", "1", " "]),
                               max_size=40).map("".join)))
def test_validate_survives_random_text(tmp_path: Any, capsys: Any, text: str | bytes) -> None:
    assume(text)
    _check_validate_result(*_validate(tmp_path, text, capsys)[:4])


yaml_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
              st.text(max_size=12)),
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(section=st.sampled_from(["hostname", "domain", "admins", "hardening", "services",
                                "backup", "notify", "timezone", "time_sync", "extra"]),
       value=yaml_values)
def test_validate_survives_any_value_in_any_section(tmp_path: Any, capsys: Any, section: str,
                                                    value: Any) -> None:
    data = {"hostname": "nas", "domain": "home.arpa", "admins": [{"name": "alice",
                                                                  "ssh_keys": [KEY1]}]}
    data[section] = value
    text = json.dumps(data, ensure_ascii=True, allow_nan=False) if _finite(value) else None
    assume(text is not None)
    assert text is not None
    _check_validate_result(*_validate(tmp_path, text, capsys)[:4])


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return value == value and abs(value) != float("inf")
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def all_paths(node: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The path of every node of ``node`` (mappings, lists and scalars)."""
    if at:
        yield at
    if isinstance(node, dict):
        for k, v in node.items():
            yield from all_paths(v, (*at, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from all_paths(v, (*at, i))


ALL_PATHS = list(all_paths(RICH))


@settings(max_examples=400, deadline=None)
@given(path=st.sampled_from(ALL_PATHS), value=yaml_values)
def test_any_wrong_value_anywhere_gets_a_readable_located_message(path: tuple[Any, ...],
                                                                  value: Any) -> None:
    assume(_finite(value))
    data = copy.deepcopy(RICH)
    node: Any = data
    for seg in path[:-1]:
        node = node[seg]
    node[path[-1]] = value
    try:
        load_server_text(json.dumps(data, ensure_ascii=True, allow_nan=False), "rich.yaml")
    except ConfigError as exc:
        event("refused")
        for issue in exc.issues:
            line = issue.format()
            assert issue.line >= 1 and issue.col >= 1 and issue.path, line
            assert not PYDANTIC_WORDS.search(line), line
    else:
        event("accepted")
