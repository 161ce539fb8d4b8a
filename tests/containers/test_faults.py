"""Faults on real Debian containers (issue 15): a target that cannot do what the model asks,
a full file system, a busy or interrupted package manager.

Run with ``SELFHOST_CONTAINER_TESTS=1 .venv/bin/pytest tests/containers -v`` (or
``scripts/test faults``). Each test starts its own ``h15-*`` container and removes it.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
from faultlib import REPO, Start, deploy, podman, sh

RELEASES = ["bookworm", "trixie"]
MODEL = f"selfhost_config={REPO}/examples/home.yaml"
# What a deploy of examples/home.yaml would change first (packages) and later (files, users).
UNTOUCHED = ("dpkg-query -W -f='${db:Status-Abbrev} ${Package}\\n' nftables caddy fail2ban "
             "2>/dev/null | grep -c '^ii' ; sha1sum /etc/ssh/sshd_config | cut -c1-40; "
             "id alice 2>&1 | grep -c 'no such user'; "
             "find /etc /srv -name '*.selfhost-new' | wc -l")


def _one_line(output: str, fragment: str) -> str:
    lines = [ln for ln in re.sub(r"\x1b\[[0-9;]*m", "", output).splitlines() if fragment in ln]
    assert lines, output[-3000:]
    return lines[0]


@pytest.mark.parametrize("release", RELEASES)
def test_no_cap_net_admin_stops_the_deploy_before_any_change(container: Start,
                                                              release: str) -> None:
    # podman's default capabilities do not include NET_ADMIN (nor NET_RAW): nft fails with
    # "Operation not permitted" in such a container.
    name = container(release)
    assert "Operation not permitted" in sh(name, "apt-get update -qq; apt-get install -y -qq nftables "
                                           ">/dev/null 2>&1 || true; nft list tables 2>&1; "
                                           "apt-get purge -y -qq nftables >/dev/null 2>&1",
                                           check=False).stdout
    before = sh(name, UNTOUCHED).stdout
    start = time.monotonic()
    res = deploy(name, "--data", MODEL)
    took = time.monotonic() - start
    assert res.returncode != 0
    line = _one_line(res.stdout + res.stderr, "CAP_NET_ADMIN")
    assert "--cap-add NET_ADMIN" in line and "firewall: {enabled: false, reason:" in line
    assert "Nothing was changed" in line
    after = sh(name, UNTOUCHED).stdout
    assert after == before, (before, after)
    assert before.split()[0] == "0" and before.split()[2] == "1"  # no package, no alice
    print(f"{release}: refused in {took:.1f} s: {line.strip()}")


@pytest.mark.parametrize("release", RELEASES)
def test_a_full_file_system_stops_the_deploy_before_any_change(container: Start,
                                                                release: str) -> None:
    # A data disk that filled up: /srv (where the web sites live) is a small file system,
    # full. The deploy would write the site there; it must stop before changing anything.
    name = container(release, "--cap-add=NET_ADMIN", "--cap-add=NET_RAW",
                     "--mount=type=tmpfs,destination=/srv,tmpfs-size=1m")
    sh(name, "dd if=/dev/zero of=/srv/fill bs=4k 2>/dev/null; df -k /srv | tail -1", check=False)
    assert sh(name, "df -P -k /srv | awk 'NR==2 {print $4}'").stdout.strip() == "0"
    before = sh(name, UNTOUCHED).stdout
    res = deploy(name, "--data", MODEL)
    assert res.returncode != 0
    line = _one_line(res.stdout + res.stderr, "is full")
    assert "(mounted on /srv) is full: 0 KiB free" in line and "Nothing was changed" in line
    after = sh(name, UNTOUCHED).stdout
    assert after == before, (before, after)
    # `selfhost check` sees the full disk too (a tmpfs here, as /tmp often is).
    check = subprocess.run([str(REPO / ".venv" / "bin" / "selfhost"), "check",
                            str(REPO / "examples" / "home.yaml"), "--podman", name, "--json"],
                           capture_output=True, text=True, timeout=300, cwd=REPO)
    assert check.returncode == 2, check.stderr
    found = {(f["severity"], f["what"]) for f in json.loads(check.stdout)["findings"]}
    assert any(sev == "error" and what.startswith("/srv is 100% full (")
               for sev, what in found), found
    print(f"{release}: {line.strip()}")


HOLD_LOCK = ("import fcntl, sys, time\n"
             "f = open('/var/lib/dpkg/lock-frontend', 'w')\n"
             "fcntl.lockf(f, fcntl.LOCK_EX)\n"
             "open('/run/h15-locked', 'w').close()\n"
             "time.sleep(int(sys.argv[1]))\n")
PACKAGES_DEPLOY = "tests/containers/deploy_packages.py"


def hold_lock(name: str, seconds: int) -> None:
    """Hold dpkg's frontend lock in the container for ``seconds``, from now."""
    sh(name, f"cat > /root/hold.py <<'EOF'\n{HOLD_LOCK}EOF")
    podman("exec", "--detach", name, "python3", "/root/hold.py", str(seconds))
    sh(name, "for i in $(seq 50); do [ -e /run/h15-locked ] && break; sleep 0.2; done; "
             "test -e /run/h15-locked")


@pytest.mark.parametrize("release", RELEASES)
def test_a_busy_package_manager_is_waited_for(container: Start, release: str) -> None:
    # What apt and unattended-upgrades do: a POSIX (fcntl) lock on dpkg's frontend lock, held
    # here for 20 s by a stand-in process (`flock` would not do: apt does not see flock locks).
    name = container(release)
    hold = 20
    hold_lock(name, hold)
    locked_at = time.monotonic()
    res = deploy(name, "--data", "packages=hello", deploy_file=PACKAGES_DEPLOY)
    took = time.monotonic() - locked_at
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    line = _one_line(out, "the package manager is busy")
    assert "python3" in line and "waits for it, up to 10 minutes" in line
    assert took >= hold - 2, took  # it waited for the lock...
    status = sh(name, "dpkg-query -W -f='${db:Status-Abbrev}' hello").stdout
    assert status.startswith("ii"), status  # ...and then installed
    print(f"{release}: lock held {hold} s, deploy done after {took:.1f} s: {line.strip()}")


@pytest.mark.parametrize("release", RELEASES)
def test_an_orphaned_install_of_a_killed_deploy_gives_way(container: Start,
                                                          release: str) -> None:
    # A deploy killed while its installer waited for a busy lock leaves that installer
    # running on the target (seen in the faults scenario: it installed its packages after the
    # next deploy had finished, holding the lock during the one after). Here: the lock is
    # held for 15 s, an installer of `hello` is left waiting for it (as a killed deploy
    # leaves it), and a new deploy wants `tree`. The old installer must stop without
    # installing anything; the new one installs once the lock is free.
    name = container(release)
    hold = 15
    hold_lock(name, hold)
    script = (REPO / "selfhost" / "backend" / "apt-install.sh").read_text(encoding="utf-8")
    sh(name, f"cat > /root/apt-install.sh <<'EOF'\n{script}EOF")
    podman("exec", "--detach", name, "sh", "-c",
           "sh /root/apt-install.sh 600 hello > /root/orphan.log 2>&1; echo $? > /root/orphan.rc")
    sh(name, "for i in $(seq 50); do grep -q busy /root/orphan.log && break; sleep 0.2; done")
    res = deploy(name, "--data", "packages=tree", deploy_file=PACKAGES_DEPLOY)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    sh(name, "for i in $(seq 50); do [ -e /root/orphan.rc ] && break; sleep 0.2; done")
    got = sh(name, "cat /root/orphan.rc; dpkg-query -W -f='${db:Status-Abbrev}\n' tree; "
                   "dpkg-query -W -f='${db:Status-Abbrev}\n' hello 2>/dev/null || echo none",
             check=False).stdout.split()
    assert got == ["75", "ii", "none"], (got, sh(name, "cat /root/orphan.log").stdout)
    assert "a newer deploy has taken over" in sh(name, "cat /root/orphan.log").stdout


@pytest.mark.parametrize("release", RELEASES)
def test_without_the_wait_apt_fails_at_once(container: Start, release: str) -> None:
    # The failure this guards against, seen for real: plain apt-get under a held lock.
    name = container(release)
    sh(name, f"cat > /root/hold.py <<'EOF'\n{HOLD_LOCK}EOF")
    podman("exec", "--detach", name, "python3", "/root/hold.py", "10")
    sh(name, "for i in $(seq 50); do [ -e /run/h15-locked ] && break; sleep 0.2; done")
    res = sh(name, "apt-get install -y -qq hello", check=False)
    assert res.returncode != 0
    assert "Could not get lock /var/lib/dpkg/lock-frontend" in res.stdout + res.stderr


@pytest.mark.parametrize("release", RELEASES)
def test_an_interrupted_dpkg_is_finished_first(container: Start, release: str) -> None:
    # The state a crash between dpkg's unpack and configure leaves: a package unpacked, not
    # configured, and dpkg's journal not empty. apt then refuses everything ("dpkg was
    # interrupted, you must manually run 'dpkg --configure -a'").
    name = container(release)
    sh(name, "apt-get update -qq && cd /root && apt-get download -qq hello && "
             "dpkg --unpack hello_*.deb >/dev/null && "
             "dpkg-query -s hello > /var/lib/dpkg/updates/0000")
    assert "interrupted" in sh(name, "apt-get install -y -qq tree 2>&1", check=False).stdout
    res = deploy(name, "--data", "packages=tree", deploy_file=PACKAGES_DEPLOY)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    _one_line(out, "dpkg was interrupted (a crash or a killed run): the deploy runs "
                   "`dpkg --configure -a` first")
    got = sh(name, "dpkg-query -W -f='${db:Status-Abbrev}\\n' hello tree; "
                   "ls /var/lib/dpkg/updates | wc -l").stdout.split()
    assert got == ["ii", "ii", "0"], got
    # With nothing left to install and dpkg healthy, the next run changes nothing.
    again = deploy(name, "--data", "packages=tree", deploy_file=PACKAGES_DEPLOY)
    assert again.returncode == 0
    assert "interrupted" not in again.stdout + again.stderr
