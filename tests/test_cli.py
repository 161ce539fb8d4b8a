"""The `selfhost` command line (selfhost.cli): validate, plan, schema."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from selfhost import cli
from selfhost.config import server_json_schema

TESTS = Path(__file__).parent
REPO = TESTS.parent
BROKEN = sorted((TESTS / "configs" / "broken").glob("*.yaml"))
VALID = sorted((TESTS / "configs" / "valid").glob("*.yaml"))
EXAMPLE = REPO / "examples" / "home.yaml"
SCHEMA_FILE = REPO / "schema" / "selfhost.schema.json"

EXPECT = re.compile(r"^# expect: (\d+:\d+: \S+): (.+)$")
ERROR_LINE = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<path>\S+): (?P<msg>.+)$")


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- validate


def test_validate_valid_files(capsys: pytest.CaptureFixture[str]) -> None:
    files = [str(p) for p in [*VALID, EXAMPLE]]
    code, out, err = run(capsys, "validate", *files)
    assert code == 0
    assert out.splitlines() == [f"{f}: ok" for f in files]
    assert err == ""


@pytest.mark.parametrize("path", BROKEN, ids=[p.stem for p in BROKEN])
def test_validate_broken_file(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    code, out, err = run(capsys, "validate", str(path))
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert lines, "an invalid file must be explained"
    for line in lines:
        m = ERROR_LINE.match(line)
        assert m, f"not FILE:LINE:COL: path: message: {line!r}"
        assert m["file"] == str(path)
        assert int(m["line"]) >= 1 and int(m["col"]) >= 1
    for text in path.read_text(encoding="utf-8").splitlines():
        e = EXPECT.match(text)
        if not e:
            break
        prefix = f"{path}:{e[1]}: "
        assert any(line.startswith(prefix) and e[2] in line for line in lines), (prefix, err)


def test_validate_reports_all_files_and_every_error(capsys: pytest.CaptureFixture[str]) -> None:
    several = TESTS / "configs" / "broken" / "several_errors.yaml"
    minimal = TESTS / "configs" / "valid" / "minimal.yaml"
    code, out, err = run(capsys, "validate", str(several), str(minimal))
    assert code == 2
    assert out == f"{minimal}: ok\n"
    assert [line.split(": ", 2)[1] for line in err.splitlines()] == [
        "hostname", "domain", "timezone", "admins.0.name", "admins.0.ssh_keys", "hardening.sshd",
    ]


def test_validate_exact_output(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "server.yaml"
    path.write_text("hostnme: nas\ndomain: home.arpa\nadmins: []\nhardening:\n  ssh:\n"
                    "    port: 70000\n", encoding="utf-8")
    code, _, err = run(capsys, "validate", str(path))
    assert code == 2
    assert err.splitlines() == [
        f"{path}:1:1: hostname: missing required key 'hostname' (is 'hostnme' a misspelling "
        "of it?)",
        f"{path}:1:1: hostnme: unknown key 'hostnme' (did you mean 'hostname'?)",
        f"{path}:3:9: admins: needs at least 1 item, got 0",
        f"{path}:6:11: hardening.ssh.port: must be at most 65535, not the number 70000",
    ]


@pytest.mark.parametrize(("data", "fragment"), [
    (b"hostname: caf\xe9\n", "not valid UTF-8"),
    (b"\x7fELF\x02\x01\x01\x00\x00\x00", "binary data (NUL byte)"),
    (b"a: \x07\n", "control character U+0007"),
    (b"x: &x [*x]\n", "recursive structures are refused"),
    (b"a: " + b"[" * 50_000, "nesting deeper than"),
], ids=["non-utf8", "binary", "control", "recursive", "deep"])
def test_validate_hostile_file(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                               data: bytes, fragment: str) -> None:
    path = tmp_path / "hostile.yaml"
    path.write_bytes(data)
    code, out, err = run(capsys, "validate", str(path))
    assert out == ""
    assert code == 2
    [line] = err.splitlines()
    assert ERROR_LINE.match(line)
    assert fragment in line


def test_validate_too_large(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_bytes(b"a: b\n" * 300_000)
    code, _, err = run(capsys, "validate", str(path))
    assert code == 2
    assert err == f"{path}:1:1: -: file is too large (more than 1024 KiB is refused; a server " \
                  "description is a few KiB)\n"


def test_validate_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "validate", str(tmp_path / "nope.yaml"))
    assert code == 2
    assert err == f"{tmp_path / 'nope.yaml'}:1:1: -: cannot read file: No such file or " \
                  "directory\n"


def test_validate_needs_a_file(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["validate"])
    assert info.value.code == 2
    assert "the following arguments are required: FILE" in capsys.readouterr().err


def test_internal_error_is_reported_without_traceback(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(path: object) -> None:
        raise RuntimeError("model bug")

    monkeypatch.setattr("selfhost.config.load_fleet", boom)
    code, _, err = run(capsys, "validate", str(EXAMPLE))
    assert code == 1
    assert err == (f"{EXAMPLE}:1:1: -: internal error: RuntimeError: model bug (run with "
                   "--debug for a traceback)\n")
    with pytest.raises(RuntimeError, match="model bug"):
        cli.main(["--debug", "validate", str(EXAMPLE)])


# --------------------------------------------------------------------------- plan


def test_plan_text(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "plan", str(EXAMPLE))
    assert code == 0, err
    assert out.startswith("Plan for nas.home.arpa (Debian bookworm): ")
    assert f"upload directory {REPO / 'examples' / 'site'} -> /srv/www/www.home.arpa" in out
    assert "Open ports (derived from the model):" in out


@pytest.mark.parametrize("path", VALID, ids=[p.stem for p in VALID])
@pytest.mark.parametrize("release", ["bookworm", "trixie"])
def test_plan_valid_configs(capsys: pytest.CaptureFixture[str], path: Path, release: str) -> None:
    code, out, err = run(capsys, "plan", str(path), "--release", release)
    assert code == 0, err
    assert f"(Debian {release})" in out.splitlines()[0]


def test_plan_json_release(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "plan", str(EXAMPLE), "--json", "--release", "trixie")
    assert code == 0
    data = json.loads(out)
    assert data["hostname"] == "nas.home.arpa"
    assert data["release"] == "trixie"
    assert data["steps"][0]["step"] == "Packages"


def test_plan_resolves_relative_paths_against_the_yaml(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    text = (TESTS / "configs" / "valid" / "minimal.yaml").read_text(encoding="utf-8")
    (conf / "server.yaml").write_text(
        text + "services:\n  web:\n    sites:\n      - host: www\n        source: site\n",
        encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # elsewhere than the YAML's directory
    code, out, err = run(capsys, "plan", "conf/server.yaml", "--json")
    assert code == 0, err
    syncs = [s for s in json.loads(out)["steps"] if s["step"] == "Sync"]
    assert [(s["src"], s["dest"]) for s in syncs] == [
        (str(conf.resolve() / "site"), "/srv/www/www.home.arpa")]


def test_plan_invalid_file(capsys: pytest.CaptureFixture[str]) -> None:
    path = TESTS / "configs" / "broken" / "bad_timezone.yaml"
    code, out, err = run(capsys, "plan", str(path))
    assert code == 2
    assert out == ""
    assert err.startswith(f"{path}:4:11: timezone: unknown time zone 'Europe/Pari'")


def test_plan_rejects_unknown_release(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["plan", str(EXAMPLE), "--release", "buster"])
    assert info.value.code == 2
    assert "invalid choice: 'buster'" in capsys.readouterr().err


# --------------------------------------------------------------------------- schema


def test_schema_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "schema")
    assert code == 0
    assert json.loads(out) == server_json_schema()
    assert out == SCHEMA_FILE.read_text(encoding="utf-8"), (
        "schema/selfhost.schema.json is stale: run "
        "`selfhost schema --output schema/selfhost.schema.json`")


def test_schema_output_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "schema" / "selfhost.schema.json"
    code, out, err = run(capsys, "schema", "--output", str(target))
    assert code == 0
    assert out == ""
    assert err == f"wrote {target}\n"
    assert json.loads(target.read_text(encoding="utf-8"))["$schema"].startswith(
        "http://json-schema.org/draft-07/")


# --------------------------------------------------------------------------- the real script


def test_console_script_end_to_end(tmp_path: Path) -> None:
    exe = shutil.which("selfhost", path=str(Path(sys.executable).parent))
    assert exe, "the `selfhost` console script is not installed in the venv"
    bomb = TESTS / "configs" / "broken" / "anchor_bomb.yaml"
    tag = TESTS / "configs" / "broken" / "python_tag.yaml"
    proc = subprocess.run([exe, "validate", str(EXAMPLE), str(bomb), str(tag)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 2
    assert proc.stdout == f"{EXAMPLE}: ok\n"
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 3
    assert all(ERROR_LINE.match(line) for line in proc.stderr.splitlines())
    assert not Path("/tmp/selfhost-test-pwned").exists()
