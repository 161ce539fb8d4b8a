"""Regenerate the compiler fixtures in ``tests/fixtures/compile/``.

Each fixture is one JSON file in pyinfra's "args + facts -> commands" style::

    {
      "description": "what the case is about",
      "input": {
        "model": {...}                      # the server model, as data
        # or "model_file": "examples/home.yaml" (path from the repository root)
        "target": {"release": "bookworm", "keep_open_ports": [22]},
        "key_files": ["/etc/ssh/sshd_config", ...]   # optional, default KEY_FILES
        "whole_plan": true                  # optional: also pin every step and the listing
      },
      "expected": {
        "plan": Plan.to_data(),             # every step; files by sha1
        "files": {path: [lines]},           # full text of the key rendered files
        "render": [lines]                   # Plan.render()
      }
    }

``tests/test_compile.py`` compiles every ``input`` and fails with a unified diff when the
output differs from ``expected``. When a change of output is intended, regenerate and review
the diff with git::

    .venv/bin/python tests/update_fixtures.py            # rewrite every fixture
    .venv/bin/python tests/update_fixtures.py web_lan_only   # only some (file stems)
    .venv/bin/python tests/update_fixtures.py --check    # exit 1 if any fixture is stale

To add a case, write a JSON file with ``description`` and ``input`` only and run the script:
it fills in ``expected``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "compile"
INLINE_BASE = Path("tests/fixtures/compile")
"""Base directory (relative to the repository root) of models given inline in a fixture."""

KEY_FILES = (
    "/etc/ssh/sshd_config",
    "/etc/nftables.conf",
    "/etc/caddy/Caddyfile",
    "/etc/fail2ban/jail.local",
    "/etc/sudoers.d/selfhost-admins",
    "/etc/apt/apt.conf.d/52selfhost-unattended-upgrades",
)

if str(ROOT) not in sys.path:  # running as a script from anywhere
    sys.path.insert(0, str(ROOT))


def load_model(inp: dict[str, Any]) -> Any:
    """The validated Server of a fixture input. Relative paths in the model resolve against
    a path relative to the repository root, so outputs do not depend on the checkout."""
    from selfhost.models import Server

    if "model_file" in inp:
        from ruamel.yaml import YAML

        rel = Path(inp["model_file"])
        data = YAML(typ="safe").load((ROOT / rel).read_text(encoding="utf-8"))
        base = rel.parent
    else:
        data = inp["model"]
        base = INLINE_BASE
    from selfhost.validation import validated

    return validated(Server.model_validate(data)).with_base_dir(base)


def example_plans(example: Path, release: str) -> list[Any]:
    """The plans of every host of an example file (a server or a fleet) for ``release``."""
    from selfhost.compile import Target, compile_fleet
    from selfhost.config import load_fleet

    fleet = load_fleet(example)
    return list(compile_fleet(fleet, {h: Target(release=release)  # type: ignore[arg-type]
                                      for h in fleet.hosts}).values())


def rendered(f: Any) -> str:
    """A managed file's content as the deploy writes it, with stand-ins for its secrets (a
    bcrypt hash for a hashed password), for checking it with its validator."""
    import base64

    from selfhost.compose.resources import SECRET_MARK

    text = f.content
    dummy = "$2b$10$" + "a" * 53
    for i, piece in enumerate(f.secrets):
        value = base64.b64encode(dummy.encode()).decode() if piece.transform == "bcrypt-base64" \
            else dummy if piece.transform == "bcrypt" \
            else "0123456789ABCDEF" * 2 if piece.transform == "nt-hash" else "stand-in-secret"
        text = text.replace(SECRET_MARK.format(i), value)
    return str(text)


def target_of(inp: dict[str, Any]) -> Any:
    from selfhost.compile import Target

    t = dict(inp.get("target", {}))
    if "keep_open_ports" in t:
        t["keep_open_ports"] = tuple(t["keep_open_ports"])
    return Target(**t)


def expected_for(inp: dict[str, Any]) -> dict[str, Any]:
    """What the compiler produces for a fixture input, as JSON-compatible data."""
    from selfhost.compile import compile_server

    plan = compile_server(load_model(inp), target_of(inp))
    files = plan.files()
    key_files = inp.get("key_files", KEY_FILES)
    out: dict[str, Any] = {
        "files": {p: files[p].split("\n") for p in key_files if p in files},
    }
    if inp.get("whole_plan"):
        # Only a few goldens pin every step: a new field on a step rewrites these alone.
        out["plan"] = plan.to_data()
        out["render"] = plan.render().split("\n")
    return json.loads(json.dumps(out))  # tuples -> lists, exactly as stored


def dump(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def fixture_paths(names: list[str] | None = None) -> list[Path]:
    paths = sorted(FIXTURES.glob("*.json"))
    if names:
        wanted = {n.removesuffix(".json") for n in names}
        paths = [p for p in paths if p.stem in wanted]
        missing = wanted - {p.stem for p in paths}
        if missing:
            raise SystemExit(f"no such fixture(s): {', '.join(sorted(missing))}")
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help="fixture file stems (default: all)")
    ap.add_argument("--check", action="store_true", help="only report stale fixtures")
    args = ap.parse_args(argv)
    stale = 0
    for path in fixture_paths(args.names):
        old_text = path.read_text(encoding="utf-8")
        fixture = json.loads(old_text)
        fixture["expected"] = expected_for(fixture["input"])
        new_text = dump(fixture)
        if new_text == old_text:
            print(f"ok       {path.name}")
            continue
        stale += 1
        if args.check:
            print(f"STALE    {path.name}")
            sys.stdout.writelines(difflib.unified_diff(
                old_text.splitlines(keepends=True), new_text.splitlines(keepends=True),
                f"{path.name} (stored)", f"{path.name} (compiled)", n=2))
        else:
            path.write_text(new_text, encoding="utf-8")
            print(f"updated  {path.name}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
