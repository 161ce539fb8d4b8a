"""The checks of the deployed system must fail on an untouched one.

molecule/default/tests/test_controls.py and test_system.py are run (as a nested pytest, with
the same testinfra podman backend) against this scenario's container: the same image and
create playbook as the default scenario, with the same things planted for the deploy to
repair, but never deployed. A check that passes here cannot tell a deployed system from an
undeployed one. The only ones allowed to pass are listed below, each with its reason.
"""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
CHECKS = REPO / "molecule" / "default" / "tests"
MODULES = ("test_controls.py", "test_system.py")

# test id (host parameter removed) -> why it passes on an untouched Debian.
PASS_UNTOUCHED = {
    "test_system.py::test_sshd_effective_setting[kbdinteractiveauthentication-no]":
        "Debian's own sshd_config already says so; the check guards that selfhost's "
        "configuration does not weaken it",
    "test_system.py::test_sshd_effective_setting[pubkeyauthentication-yes]":
        "OpenSSH's default; same reason",
    "test_system.py::test_service_enabled_and_running[ssh]":
        "openssh-server is part of the image: a server is reached by SSH before any deploy",
    "test_controls.py::test_no_failed_unit":
        "the health of the whole system, not a control: an untouched system has no failed "
        "unit either",
    "test_controls.py::test_no_failed_sudo_attempts_by_services":
        "the absence of an event (a service trying sudo) that only deployed services cause",
}
# Checks that cannot run in a container at all (they skip there, deployed or not).
SKIP_IN_CONTAINER = {
    "test_controls.py::test_apparmor_confines_where_the_kernel_is_ours":
        "AppArmor belongs to the host's kernel",
}


def _test_id(classname: str, name: str, container: str) -> str:
    module = classname.rsplit(".", 1)[-1] + ".py"
    name = name.replace(f"podman://{container}-", "").replace(f"[podman://{container}]", "")
    return f"{module}::{name}"


def run_checks(container: str, junit: Path) -> dict[str, str]:
    """Outcome (passed, failed, error, skipped) of every check against ``container``."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=no",
         f"--hosts=podman://{container}", f"--junitxml={junit}", *MODULES],
        cwd=CHECKS, capture_output=True, text=True, timeout=1200, check=False)
    assert junit.exists(), done.stdout + done.stderr
    outcomes: dict[str, str] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped":
                # An expected failure (a known gap, see the check) is not a pass either.
                outcome = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
        outcomes[_test_id(case.get("classname", ""), case.get("name", ""), container)] = outcome
    return outcomes


def test_every_control_check_fails_on_an_untouched_system(host: Any, tmp_path: Path) -> None:
    container = host.backend.name
    # The container is as the default scenario creates it, before its first deploy.
    assert host.package("telnet").is_installed
    assert re.fullmatch(r"\S+", host.check_output("hostname"))
    outcomes = run_checks(container, tmp_path / "untouched.xml")
    assert len(outcomes) > 50, outcomes

    passed = {t for t, o in outcomes.items() if o == "passed"}
    skipped = {t for t, o in outcomes.items() if o == "skipped"}
    unexpected = sorted(passed - PASS_UNTOUCHED.keys())
    assert unexpected == [], "checks that pass on an untouched system:\n" + "\n".join(unexpected)
    assert skipped <= SKIP_IN_CONTAINER.keys(), sorted(skipped)
    # The list of exceptions stays exact: a check that no longer passes here leaves it.
    assert passed == PASS_UNTOUCHED.keys(), sorted(PASS_UNTOUCHED.keys() - passed)
    failed = [t for t, o in outcomes.items() if o in ("failed", "xfailed")]
    print(f"{len(failed)} of {len(outcomes)} checks fail on the untouched system, "
          f"{len(passed)} pass (listed with reasons), {len(skipped)} skip")
