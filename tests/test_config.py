"""YAML loading and error reporting (selfhost.config).

The corpus in tests/configs/broken/ holds one broken server description per file, each
starting with `# expect: LINE:COL: path: fragment-of-message` lines: every expected problem
must be reported at exactly that line, column and field path, and nothing else may be.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from selfhost.config import (
    MAX_ALIASES,
    MAX_BYTES,
    MAX_DEPTH,
    MAX_NODES,
    ConfigError,
    Issue,
    load_server,
    load_server_bytes,
    load_server_text,
    server_json_schema,
)
from selfhost.models.server import Server

TESTS = Path(__file__).parent
REPO = TESTS.parent
BROKEN = sorted((TESTS / "configs" / "broken").glob("*.yaml"))
VALID = sorted((TESTS / "configs" / "valid").glob("*.yaml"))
SCHEMA_FILE = REPO / "schema" / "selfhost.schema.json"

EXPECT = re.compile(r"^# expect: (\d+):(\d+): (\S+): (.+)$")

KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAcDUnIB8pafK5YzOjFNMxx3cvqHL0AlzF6hjAr0j8sw "
       "alice@laptop")
MINIMAL = f"hostname: nas\ndomain: home.arpa\nadmins:\n  - name: alice\n    ssh_keys: ['{KEY}']\n"


def expectations(path: Path) -> list[tuple[int, int, str, str]]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        m = EXPECT.match(line)
        if not m:
            break
        out.append((int(m[1]), int(m[2]), m[3], m[4]))
    return out


def issues_of(text: str | bytes, name: str = "f.yaml") -> list[Issue]:
    with pytest.raises(ConfigError) as info:
        if isinstance(text, bytes):
            load_server_bytes(text, name)
        else:
            load_server_text(text, name)
    assert info.value.issues, "a ConfigError must carry its issues"
    return info.value.issues


def one_issue(text: str | bytes) -> Issue:
    issues = issues_of(text)
    assert len(issues) == 1, [i.format() for i in issues]
    return issues[0]


# --------------------------------------------------------------------------- the corpus


def test_corpus_is_large_enough() -> None:
    assert len(BROKEN) >= 20
    assert len(VALID) >= 2
    for path in BROKEN:
        assert expectations(path), f"{path.name} has no `# expect:` line"


@pytest.mark.parametrize("path", BROKEN, ids=[p.stem for p in BROKEN])
def test_broken_config_reports_every_expected_problem(path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_server(path)
    issues = info.value.issues
    got = [i.format() for i in issues]
    expected = expectations(path)
    for line, col, field, fragment in expected:
        matches = [i for i in issues
                   if (i.line, i.col, i.path) == (line, col, field) and fragment in i.message]
        assert matches, f"expected {line}:{col}: {field}: ...{fragment}... in\n" + "\n".join(got)
    # Nothing unexpected either: every reported problem is one the file announces.
    assert len(issues) == len(expected), "\n".join(got)
    assert all(i.file == str(path) for i in issues)


@pytest.mark.parametrize("path", [*VALID, REPO / "examples" / "home.yaml"],
                         ids=[*(p.stem for p in VALID), "examples-home"])
def test_valid_configs_load(path: Path) -> None:
    server = load_server(path)
    assert isinstance(server, Server)
    assert server.base_dir == path.parent.resolve()


def test_full_config_values() -> None:
    server = load_server(TESTS / "configs" / "valid" / "full.yaml")
    assert server.fqdn == "web01.example.org"
    assert [a.name for a in server.admins] == ["alice", "carol"]
    assert server.hardening.ssh.port == 2222
    assert server.hardening.firewall.log_dropped is False  # `no` is YAML 1.1; pydantic reads it
    assert server.hardening.updates.reboot_time == "03:30"  # not sexagesimal
    web = server.services.web
    assert web is not None
    # `headers: *common` repeats the anchored mapping; `<<: *common` merges it, and the
    # explicit key wins over the merged one.
    assert web.sites[1].headers == web.sites[0].headers
    assert web.sites[2].headers == {"Cache-Control": "no-store",
                                    "Permissions-Policy": "interest-cohort=()"}


def test_python_tag_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = (f'hostname: !!python/object/apply:os.system ["touch {marker}"]\n'
            f"domain: !!python/object/apply:subprocess.check_call [[touch, {marker}]]\n"
            "admins: !!python/name:os.system\n")
    issues = issues_of(text)
    assert [(i.line, i.path) for i in issues] == [(1, "hostname"), (2, "domain"), (3, "admins")]
    assert all("is refused" in i.message for i in issues)
    assert not marker.exists()
    assert not Path("/tmp/selfhost-test-pwned").exists()  # the corpus file's command


# --------------------------------------------------------------------------- hostile files


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("hostname: nas\ndomain: caf\u00e9.example\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_server(path)
    [issue] = info.value.issues
    assert (issue.line, issue.col, issue.path) == (2, 12, "-")
    assert "not valid UTF-8 (byte 0xe9)" in issue.message


def test_binary_junk(tmp_path: Path) -> None:
    path = tmp_path / "junk.yaml"
    path.write_bytes(b"hostname: nas\n" + bytes(range(256)) * 4)
    with pytest.raises(ConfigError) as info:
        load_server(path)
    [issue] = info.value.issues
    assert (issue.line, issue.col) == (2, 1)
    assert "binary data (NUL byte)" in issue.message


def test_utf16_file() -> None:
    issue = one_issue(MINIMAL.encode("utf-16"))
    assert (issue.line, issue.col, issue.path) == (1, 1, "-")
    assert issue.message == "the file is UTF-16: save it as UTF-8"


def test_control_characters_are_refused() -> None:
    issue = one_issue(b"hostname: nas\ndomain: home\x1b[31m.arpa\n")
    assert (issue.line, issue.col, issue.path) == (2, 13, "-")
    assert "control character U+001B" in issue.message


def test_file_too_large(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_bytes(b"# padding\n" * (MAX_BYTES // 10 + 1))
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_server(path)
    assert time.perf_counter() - start < 0.5
    [issue] = info.value.issues
    assert "file is too large" in issue.message


def test_file_at_the_limit_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    body = MINIMAL.encode()
    path.write_bytes(body + b"#" * (MAX_BYTES - len(body)))
    assert load_server(path).hostname == "nas"


def test_anchor_bomb_is_refused_quickly() -> None:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for n in range(1, 10):
        lines.append(f"l{n}: &l{n} [" + ", ".join([f"*l{n - 1}"] * 9) + "]")
    start = time.perf_counter()
    issue = one_issue("\n".join(lines) + "\n")
    assert time.perf_counter() - start < 0.5
    assert f"more than {MAX_NODES} YAML nodes" in issue.message
    assert "alias bomb" in issue.message


def test_too_many_aliases() -> None:
    text = "a: &a x\nb: [" + ", ".join(["*a"] * (MAX_ALIASES + 5)) + "]\n"
    issue = one_issue(text)
    assert issue.path == f"b.{MAX_ALIASES}"
    assert f"more than {MAX_ALIASES} aliases" in issue.message


def test_too_many_nodes_without_aliases() -> None:
    issue = one_issue("a: [" + ", ".join(["1"] * (MAX_NODES + 10)) + "]\n")
    assert f"more than {MAX_NODES} YAML nodes" in issue.message


@pytest.mark.parametrize(("text", "col"), [
    ("a: " + "[" * 100_000, 4 + MAX_DEPTH),
    ("a: " + "{b: " * 100_000, 4 + 4 * MAX_DEPTH),
], ids=["flow-list", "flow-map"])
def test_deep_flow_nesting_is_refused_quickly(text: str, col: int) -> None:
    start = time.perf_counter()
    issue = one_issue(text)
    assert time.perf_counter() - start < 0.5
    assert (issue.line, issue.col) == (1, col)
    assert f"nesting deeper than {MAX_DEPTH} levels" in issue.message


def test_deep_block_nesting_is_refused() -> None:
    text = "".join(" " * i + f"k{i}:\n" for i in range(200))
    issue = one_issue(text)
    assert issue.line == MAX_DEPTH + 1
    assert issue.path.startswith("k0.k1.k2")
    assert f"nesting deeper than {MAX_DEPTH} levels" in issue.message


def test_brackets_in_quotes_and_comments_do_not_count_as_nesting() -> None:
    many = "[" * (MAX_DEPTH + 5)
    text = MINIMAL + f"# {many}\ntimezone: '{many}'\n"
    issue = one_issue(text)
    assert issue.path == "timezone"
    assert "unknown time zone" in issue.message


@pytest.mark.parametrize(("text", "fragment"), [
    ("", "the file is empty"),
    ("\n   \n", "the file is empty"),
    ("# just a comment\n", "the file is empty"),
    ("---\n", "the file is empty"),
    ("~\n", "the file is empty"),
    ("- a\n- b\n", "the top level must be a mapping (`hostname: ...`, `domain: ...`, ...), "
                   "not a list"),
    ("42\n", "not a int"),
], ids=["empty", "blank", "comment", "document-marker", "null", "list", "scalar"])
def test_top_level_must_be_a_mapping(text: str, fragment: str) -> None:
    issue = one_issue(text)
    assert issue.path == "(root)"
    assert fragment in issue.message


def test_recursive_alias() -> None:
    issue = one_issue("a: &x [1, *x]\n")
    assert (issue.line, issue.col, issue.path) == (1, 11, "a.1")
    assert "recursive structures are refused" in issue.message


# --------------------------------------------------------------------------- YAML details


def test_syntax_error_position_and_context() -> None:
    issue = one_issue("hostname: nas\nadmins: [a, b\n")
    assert (issue.line, issue.path) == (3, "-")
    assert issue.message.startswith("YAML syntax error: ")
    assert "while parsing a flow sequence at line 2, column 9" in issue.message


def test_duplicate_keys_are_all_reported_with_other_errors() -> None:
    text = MINIMAL + "domain: example.org\nhostname: x\ntimezone: Mars/Olympus\n"
    got = [i.format() for i in issues_of(text)]
    assert got == [
        "f.yaml:6:1: domain: duplicate key 'domain' (first given at line 2, column 1; the "
        "first value is used)",
        "f.yaml:7:1: hostname: duplicate key 'hostname' (first given at line 1, column 1; the "
        "first value is used)",
        "f.yaml:8:11: timezone: unknown time zone 'Mars/Olympus'",
    ]


def test_nested_duplicate_key() -> None:
    issue = one_issue(MINIMAL + "hardening:\n  ssh:\n    port: 22\n    port: 2222\n")
    assert (issue.line, issue.col, issue.path) == (9, 5, "hardening.ssh.port")


def test_non_scalar_key() -> None:
    issue = one_issue(MINIMAL + "? [a, b]\n: 1\n")
    assert (issue.line, issue.col, issue.path) == (6, 3, "(root)")
    assert "a mapping key must be a plain value, not a list" in issue.message


@pytest.mark.parametrize(("tag", "ok"), [
    ("!!str", True), ("!", True), ("!!int", False), ("!!binary", False), ("!secret", False),
    ("!<tag:yaml.org,2002:str>", True), ("!!python/str", False),
])
def test_only_core_tags_are_accepted(tag: str, ok: bool) -> None:
    text = MINIMAL.replace("hostname: nas", f"hostname: {tag} nas")
    if ok:
        assert load_server_text(text).hostname == "nas"
    else:
        issue = one_issue(text)
        assert (issue.line, issue.col, issue.path) == (1, 11, "hostname")
        assert ("is refused" in issue.message) or ("is not a valid !!int" in issue.message)


def test_core_schema_scalars() -> None:
    text = MINIMAL + ("hardening:\n  ssh:\n    port: 0x8AE\n    max_auth_tries: !!int '4'\n"
                      "    x11_forwarding: False\n  fail2ban:\n    ignore: [1.2, 010, null]\n")
    # 1.2 and 010 are numbers, null is None: pydantic wants strings; the other values are fine.
    got = [(i.col, i.path, i.message) for i in issues_of(text)]
    assert got == [(col, f"hardening.fail2ban.ignore.{n}", f"expected text, not {what}")
                   for n, (col, what) in enumerate(((14, "the number 1.2"), (19, "the number 10"),
                                                    (24, "an empty value (null)")))]
    good = load_server_text(text.replace("[1.2, 010, null]", "['1.2', '010']"))
    assert good.hardening.ssh.port == 2222
    assert good.hardening.ssh.max_auth_tries == 4
    assert good.hardening.fail2ban.ignore == ["1.2", "010"]


def test_crlf_and_bom() -> None:
    text = "\ufeff" + MINIMAL.replace("\n", "\r\n") + "timezone: Nowhere\r\n"
    issue = one_issue(text.encode("utf-8"))
    assert (issue.line, issue.col, issue.path) == (6, 11, "timezone")


def test_empty_value_points_at_its_key() -> None:
    issue = one_issue(MINIMAL + "services:\n  web:\n    sites:\n")
    assert (issue.line, issue.col, issue.path) == (8, 5, "services.web.sites")
    assert issue.message == ("expected a list (`- item` lines, or [a, b]), not an empty value "
                             "(null)")


def test_merged_keys_keep_their_own_positions() -> None:
    text = MINIMAL + ("hardening:\n  ssh: &ssh\n    port: 99999\n"
                      "  firewall:\n    <<: *ssh\n")
    got = [(i.line, i.col, i.path) for i in issues_of(text)]
    assert (8, 11, "hardening.ssh.port") in got
    # The merged `port` is reported where it was written, under its new path.
    assert (8, 5, "hardening.firewall.port") in got


# --------------------------------------------------------------------------- model paths


def test_missing_fields_point_at_the_parent_mapping() -> None:
    text = "# comment\n\nhostname: nas\nadmins:\n  - sudo: true\n"
    got = [(i.line, i.col, i.path, i.message) for i in issues_of(text)]
    assert got == [
        (3, 1, "domain", "missing required key 'domain'"),
        (5, 5, "admins.0.name", "missing required key 'name'"),
    ]


def test_unknown_key_suggestions_through_optional_list_and_union() -> None:
    text = MINIMAL + ("    password_hash: {envv: HASH}\nservices:\n  web:\n    sites:\n"
                      "      - hots: www\n    tsl: auto\n")
    got = {i.path: (i.line, i.col, i.message) for i in issues_of(text)}
    # str | SecretRef | None -> SecretRef; the "not a string" member is left out.
    assert got["admins.0.password_hash.envv"] == (
        6, 21, "unknown key 'envv' (did you mean 'env'?)")
    # WebService | None -> list[Site] -> Site.
    assert got["services.web.sites.0.hots"] == (
        10, 9, "unknown key 'hots' (did you mean 'host'?)")
    assert got["services.web.sites.0.host"][2] == (
        "missing required key 'host' (is 'hots' a misspelling of it?)")
    assert got["services.web.tsl"] == (11, 5, "unknown key 'tsl' (did you mean 'tls'?)")
    assert len(got) == 4


def test_unknown_key_without_close_match_lists_allowed_keys() -> None:
    issue = one_issue(MINIMAL + "hardening:\n  updates:\n    frobnicate: 1\n")
    assert issue.path == "hardening.updates.frobnicate"
    assert issue.message.startswith("unknown key 'frobnicate'; allowed keys: ")
    assert "automatic_reboot" in issue.message and "reason" in issue.message


def test_dict_values_and_keys() -> None:
    text = MINIMAL + ("services:\n  web:\n    sites:\n      - host: www\n"
                      "        headers: {X-A: [1], 7: b}\n")
    got = [(i.line, i.col, i.path, i.message) for i in issues_of(text)]
    assert got == [
        (10, 24, "services.web.sites.0.headers.X-A", "expected text, not a list"),
        (10, 29, "services.web.sites.0.headers.7", "invalid key 7: expected text, not the number 7"),
    ]


def test_union_members_are_merged_into_one_line() -> None:
    text = MINIMAL + "hardening:\n  ssh:\n    allow_from: [10.0.0.0/8, lan]\n"
    issue = one_issue(text)
    assert (issue.line, issue.col, issue.path) == (8, 30, "hardening.ssh.allow_from.1")
    assert issue.message == ("expected a network such as 192.168.1.0/24 or fd00::/8 (an address "
                             "alone is ADDRESS/32), not the text 'lan'")


def test_value_error_prefix_is_stripped() -> None:
    issue = one_issue(MINIMAL.replace("domain: home.arpa", "domain: x"))
    assert issue.message.startswith("a domain is two or more DNS labels")


def test_cross_field_problems_get_their_own_positions() -> None:
    text = ("hostname: nas\ndomain: home.arpa\nadmins:\n  - name: alice\n  - name: bob\n"
            f"    ssh_keys: ['{KEY}']\n  - name: alice\n    ssh_keys: []\n")
    got = [(i.line, i.col, i.path) for i in issues_of(text)]
    assert got == [
        (4, 5, "admins.0.ssh_keys"),
        (7, 11, "admins.2.name"),
        (8, 15, "admins.2.ssh_keys"),
    ]


def test_weak_password_is_located_and_never_shown(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    """A password reference that can be read while validating is strength-checked there; the
    problem is reported like any other, at the reference, without the password."""
    weak = "password1234567"
    monkeypatch.setenv("SELFHOST_TEST_WEAK_PASSWORD", weak)
    secret = tmp_path / "pw"
    secret.write_text("mynasmynasmynas1\n")
    text = MINIMAL + ("    password: {env: SELFHOST_TEST_WEAK_PASSWORD}\n"
                      f"  - name: bob\n    ssh_keys: ['{KEY}']\n    password: {{file: {secret}}}\n")
    path = tmp_path / "nas.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_server(path)
    got = [i.format() for i in info.value.issues]
    assert [g.split(": the password")[0] for g in got] == [
        f"{path}:6:15: admins.0.password",
        f"{path}:9:15: admins.1.password",
    ]
    assert "too weak: it is too easy to guess (zxcvbn rates it 1/4" in got[0]
    assert "too weak: it contains the host name; it is too easy to guess" in got[1]
    assert all(weak not in g and "mynas" not in g for g in got)
    # Where the secret cannot be read, the model is valid: the deploy checks it.
    monkeypatch.delenv("SELFHOST_TEST_WEAK_PASSWORD")
    secret.unlink()
    assert load_server(path).admins[0].password is not None


# --------------------------------------------------------------------------- API


def test_issue_format_and_error() -> None:
    issue = Issue("a.yaml", 3, 7, "admins.0.name", "bad")
    assert issue.format() == "a.yaml:3:7: admins.0.name: bad"
    err = ConfigError([issue, Issue("a.yaml", 1, 1, "(root)", "worse")])
    assert err.issues[0] is issue
    assert str(err) == "a.yaml:3:7: admins.0.name: bad\na.yaml:1:1: (root): worse"


def test_issues_are_sorted_by_position() -> None:
    text = "timezone: Nowhere\n" + MINIMAL + "hardening: {ssh: {port: 0}}\n"
    lines = [i.line for i in issues_of(text)]
    assert lines == sorted(lines) and len(lines) == 2


def test_load_server_text_base_dir(tmp_path: Path) -> None:
    assert load_server_text(MINIMAL).base_dir == Path.cwd()
    assert load_server_text(MINIMAL, base_dir=tmp_path).base_dir == tmp_path


def test_unreadable_paths(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_server(tmp_path / "nope.yaml")
    [issue] = info.value.issues
    assert issue.format() == f"{tmp_path / 'nope.yaml'}:1:1: -: cannot read file: No such " \
                             "file or directory"
    with pytest.raises(ConfigError) as info:
        load_server(tmp_path)
    assert "is a directory" in info.value.issues[0].message


# --------------------------------------------------------------------------- schema


def test_committed_schema_is_up_to_date() -> None:
    committed = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    assert committed == server_json_schema(), (
        "schema/selfhost.schema.json is stale: run "
        "`selfhost schema --output schema/selfhost.schema.json`")


def test_schema_shape() -> None:
    schema = server_json_schema()
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["title"] == "selfhost server description"
    # A file describes one server, or a fleet of them.
    assert schema["anyOf"] == [{"$ref": "#/$defs/Server"}, {"$ref": "#/$defs/Fleet"}]
    server = schema["$defs"]["Server"]
    assert server["type"] == "object"
    assert server["additionalProperties"] is False
    assert set(server["required"]) == {"hostname", "domain", "admins"}
    assert set(schema["$defs"]["Fleet"]["required"]) == {"hosts"}

    def refs_with_siblings(node: object) -> list[object]:
        if isinstance(node, dict):
            bad = [node] if "$ref" in node and len(node) > 1 else []
            return bad + [x for v in node.values() for x in refs_with_siblings(v)]
        if isinstance(node, list):
            return [x for v in node for x in refs_with_siblings(v)]
        return []

    assert refs_with_siblings(schema) == []  # draft 7 ignores keywords beside $ref
    assert server["properties"]["hardening"]["allOf"] == [{"$ref": "#/$defs/Hardening"}]


def test_example_references_the_schema() -> None:
    first = (REPO / "examples" / "home.yaml").read_text(encoding="utf-8").splitlines()[0]
    assert first == "# yaml-language-server: $schema=../schema/selfhost.schema.json"
    assert (REPO / "examples" / "../schema/selfhost.schema.json").is_file()
