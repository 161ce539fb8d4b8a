"""`selfhost check` against the converged container, then against a tampered one.

The check reads the target in one round trip (podman exec) and compares it with the plan of
examples/home.yaml; each tampering must show as its exact finding, and putting things back
must make the check clean again.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
MODEL = REPO / "examples" / "home.yaml"
JAIL = "/etc/fail2ban/jail.local"


def check(name: str) -> tuple[int, list[dict[str, Any]]]:
    res = subprocess.run([str(REPO / ".venv" / "bin" / "selfhost"), "check", str(MODEL),
                          "--podman", name, "--json"], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert res.returncode in (0, 1, 2), res.stderr
    return res.returncode, json.loads(res.stdout)["findings"]


def errors(found: list[dict[str, Any]]) -> list[str]:
    return [f["what"] for f in found if f["severity"] == "error"]


def test_converged_host_has_no_drift_and_no_failure(host: Any) -> None:
    code, found = check(host.backend.name)
    # Warnings may remain (security updates published since the image was built).
    assert code in (0, 1) and errors(found) == [], found


def test_tampering_is_found_and_a_redeploy_state_is_clean_again(host: Any) -> None:
    name = host.backend.name
    original = host.file(JAIL).content_string
    try:
        host.check_output(f"echo '# tampered by hand' >> {JAIL}")
        # Stopped and masked by hand: a masked unit can be neither enabled nor started, so
        # the deploy unmasks it first (the model wins).
        host.check_output("systemctl mask --now cron.service")
        host.check_output("chmod 0666 /etc/issue")
        # A local file that sorts after the model's sysctl file overrides it at boot.
        host.check_output("echo 'kernel.sysrq = 1' > /etc/sysctl.d/99-zzz-local.conf")
        host.check_output("nohup python3 -m http.server 8765 --bind 0.0.0.0 "
                          ">/dev/null 2>&1 & sleep 1")
        code, found = check(name)
        assert code == 2
        whats = {f["what"]: f for f in found}
        assert f"write-file {JAIL}: content differs" in whats
        assert "+# tampered by hand" not in whats[f"write-file {JAIL}: content differs"]["diff"]
        assert "-# tampered by hand" in whats[f"write-file {JAIL}: content differs"]["diff"]
        assert "start-unit cron.service: inactive" in whats
        assert "enable-unit cron.service: masked" in whats
        assert "fix-file-meta /etc/issue: root:root 0666 -> root:root 0644" in whats
        assert ("kernel setting kernel.sysrq = 1 at boot: /etc/sysctl.d/99-zzz-local.conf "
                "overrides the model's 0") in whats
        assert any(f["area"] == "exposure" and f["what"].startswith("8765/tcp on 0.0.0.0")
                   for f in found), found
        # The re-deploy puts back what the model owns: the file, the unit, the mode. A local
        # sysctl file and a program of the user's are theirs: the check still names them, and
        # the user removes them (as the findings say).
        res = redeploy(name)
        assert res.returncode == 0, res.stderr[-3000:]
        code, found = check(name)
        assert sorted(errors(found)) == [
            "kernel setting kernel.sysrq = 1 at boot: /etc/sysctl.d/99-zzz-local.conf "
            "overrides the model's 0"], found
    finally:
        host.run(f"printf %s {shlex.quote(original)} > {JAIL}")
        host.run("rm -f /etc/sysctl.d/99-zzz-local.conf")
        host.run("chmod 0644 /etc/issue; systemctl unmask cron.service; "
                 "systemctl start cron.service")
        host.run("pkill -f 'http.server 8765'")
    code, found = check(name)
    assert errors(found) == [], found


def redeploy(name: str) -> subprocess.CompletedProcess[str]:
    """The model's deploy again, as converge.yml runs it (one host)."""
    return subprocess.run([str(REPO / ".venv" / "bin" / "pyinfra"), "-y",
                           "inventories/molecule.py", "deploys/home_server.py"],
                          capture_output=True, text=True, timeout=900, cwd=REPO,
                          env={**os.environ, "SELFHOST_MOLECULE_HOSTS": name,
                               "SELFHOST_CONFIG": str(MODEL)})


def daily(host: Any) -> str:
    """Run the daily on-host check as its timer does; return its findings."""
    host.check_output("systemctl start selfhost-check.service")
    return str(host.file("/var/lib/selfhost/check/last").content_string)


def test_the_daily_check_reports_drift_once_and_only_when_worse(host: Any) -> None:
    assert host.service("selfhost-check.timer").is_enabled
    assert "error" not in daily(host)  # right after the deploy: nothing to report
    original = host.file("/etc/issue").content_string
    since = host.check_output("date '+%Y-%m-%d %H:%M:%S'")
    try:
        host.check_output("echo 'tampered' >> /etc/issue")
        assert "error\tdrift\t/etc/issue differs from the model" in daily(host)
        daily(host)  # the same news the next day: logged, but not "worse"
        journal = host.check_output(f"journalctl -t selfhost-check --since '{since}' "
                                    "--no-pager -o cat")
        assert journal.count("worse since the last check: 1 new finding(s)") == 1, journal
        assert journal.count("drift: /etc/issue differs from the model") == 2, journal
    finally:
        host.run(f"printf %s {shlex.quote(original)} > /etc/issue")
    assert "error" not in daily(host)
