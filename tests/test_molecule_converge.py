"""The Molecule converge playbooks' idempotence logic, run for real with ansible-playbook and
a stand-in for pyinfra (a script that prints a chosen output on stderr, as pyinfra does).

Molecule's idempotence step converges twice and fails if the second run reports a change;
the playbooks turn pyinfra's "Grand total" row into that change. A run that prints no
results table (pyinfra crashed or stopped early, but exited 0) must fail the converge, never
pass as "no change".
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"

TABLE = """
--> Results:
    Operation             Hosts   Success   Error   No Change
    selfhost: packages    1       {changed}         -       {nochange}
    Grand total           1       {changed}         -       {nochange}

--> Disconnecting from hosts...
"""
OUTPUTS = {
    "no_table": "--> Loading config...\n--> Preparing operations...\n",
    "no_change": TABLE.format(changed="-", nochange="12"),
    "changed": TABLE.format(changed="3", nochange="9"),
}
PLATFORMS = {
    "default": [{"name": "c1", "release": "bookworm"}],
    "backup": [{"name": "c1", "release": "bookworm"},
               {"name": "c1-friend", "release": "bookworm", "network_of": "c1"}],
}


def converge(scenario: str, output: str, tmp_path: Path) -> tuple[int, str]:
    """Run molecule/<scenario>/converge.yml with the stand-in; (exit status, recap line)."""
    if not ANSIBLE_PLAYBOOK.exists():
        pytest.fail(f"{ANSIBLE_PLAYBOOK} is missing: run scripts/setup (test extras)")
    fake = tmp_path / "pyinfra"
    (tmp_path / "out.txt").write_text(output)
    fake.write_text(f"#!/bin/sh\ncat {tmp_path / 'out.txt'} >&2\nexit 0\n")
    fake.chmod(0o755)
    extra = tmp_path / "vars.json"
    extra.write_text(json.dumps({"pyinfra": str(fake),
                                 "molecule_yml": {"platforms": PLATFORMS[scenario]}}))
    env = {**os.environ, "ANSIBLE_HOME": str(tmp_path / "ansible"),
           "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible" / "tmp"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_LOCALHOST_WARNING": "0", "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0"}
    done = subprocess.run(
        [str(ANSIBLE_PLAYBOOK), str(ROOT / "molecule" / scenario / "converge.yml"),
         "-e", f"@{extra}"], capture_output=True, text=True, env=env, timeout=120,
        check=False)
    recap = re.search(r"^localhost\s+:.*$", done.stdout, re.M)
    assert recap, done.stdout + done.stderr
    return done.returncode, recap.group(0)


@pytest.mark.parametrize("scenario", ["default", "backup"])
def test_converge_without_results_table_fails(scenario: str, tmp_path: Path) -> None:
    rc, recap = converge(scenario, OUTPUTS["no_table"], tmp_path)
    assert rc != 0 and "failed=1" in recap, recap


@pytest.mark.parametrize("scenario", ["default", "backup"])
def test_converge_reports_change_only_when_pyinfra_changed_something(
        scenario: str, tmp_path: Path) -> None:
    rc, recap = converge(scenario, OUTPUTS["no_change"], tmp_path)
    assert rc == 0 and "changed=0" in recap, recap
    rc, recap = converge(scenario, OUTPUTS["changed"], tmp_path)
    assert rc == 0 and "changed=1" in recap, recap
