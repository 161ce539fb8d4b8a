"""A target that crashes in the middle of a deploy (issue 15): the container is killed while
dpkg is unpacking or configuring the first converge's packages, then started again (what a
power cut or a kernel panic does to a real server, minus lost disk writes, which dpkg's own
fsyncs cover). The next deploy must converge, finishing the interrupted dpkg run, and the one
after it must change nothing.

Run with ``SELFHOST_CONTAINER_TESTS=1 .venv/bin/pytest tests/containers -v`` (or
``scripts/test faults``)."""

from __future__ import annotations

import re
import subprocess
import time

import pytest
from faultlib import PYINFRA, REPO, Start, deploy, podman, sh
from test_faults import RELEASES

MODEL = f"selfhost_config={REPO}/examples/home.yaml"
TOTAL = re.compile(r"Grand total\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)")
# What dpkg left: packages not fully installed (`dpkg --audit` lists them), and its journal.
DPKG_STATE = ("dpkg-query -W -f='${db:Status-Abbrev}\\n' 2>/dev/null | grep -vc '^ii' ; "
              "ls /var/lib/dpkg/updates | wc -l")


def _wait_booted(name: str) -> None:
    state = ""
    for _ in range(90):
        state = podman("exec", name, "systemctl", "is-system-running", "--wait",
                       check=False, timeout=200).stdout.strip()
        if state in ("running", "degraded"):
            return
        time.sleep(2)
    raise AssertionError(f"{name} did not boot again: {state}")


def _changed(output: str) -> str:
    totals = TOTAL.findall(re.sub(r"\x1b\[[0-9;]*m", "", output))
    return totals[-1][1] if totals else "?"


@pytest.mark.parametrize("release", RELEASES)
def test_a_target_killed_while_dpkg_runs_converges_after_its_restart(container: Start,
                                                                      release: str) -> None:
    name = container(release, "--cap-add=NET_ADMIN", "--cap-add=NET_RAW")
    proc = subprocess.Popen([str(PYINFRA), "-y", f"@podman/{name}", "deploys/home_server.py",
                             "--data", MODEL], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    # Wait for apt's dpkg run itself (the one with a status pipe: not apt's download, nor a
    # short `dpkg --print-architecture` of apt's start, which a loaded machine can catch), then
    # let it work for a moment: the kill lands in the middle of unpacking or configuring.
    seen = None
    t0 = time.monotonic()
    while time.monotonic() - t0 < 300 and proc.poll() is None:
        if podman("exec", name, "pgrep", "-f", "dpkg .*--status-fd",
                  check=False).returncode == 0:
            seen = time.monotonic() - t0
            break
        time.sleep(0.3)
    assert seen is not None, "dpkg never ran: the deploy ended or never reached the packages"
    time.sleep(2)
    podman("kill", "--signal", "KILL", name)
    proc.wait(timeout=120)  # the deploy fails on its own once its target is gone
    podman("start", name)
    _wait_booted(name)
    left = sh(name, DPKG_STATE).stdout.split()
    # The crash must have left dpkg's work unfinished, or this test proves nothing.
    assert left != ["0", "0"], left

    first = deploy(name, "--data", MODEL)
    out = first.stdout + first.stderr
    assert first.returncode == 0, out[-4000:]
    assert sh(name, DPKG_STATE).stdout.split() == ["0", "0"]
    assert sh(name, "dpkg --audit | wc -l").stdout.strip() == "0"
    assert sh(name, "systemctl is-active ssh nftables caddy fail2ban").stdout.split() == \
        ["active"] * 4
    second = deploy(name, "--data", MODEL)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert _changed(second.stdout + second.stderr) in ("0", "-"), second.stdout[-3000:]
    print(f"{release}: killed {seen + 2:.1f} s into the deploy (dpkg running); after the "
          f"restart: {left[0]} package(s) not installed, {left[1]} journal entries; the next "
          f"deploy converged, the one after changed nothing")
