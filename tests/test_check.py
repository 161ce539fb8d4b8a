"""`selfhost check`: findings from a plan, a target state and health facts (pure)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from test_diff import converged, plan

from selfhost.check import (
    COMMON_PORTS,
    EXIT_FAIL,
    EXIT_OK,
    EXIT_WARN,
    Facts,
    exit_code,
    exposure,
    findings,
    health_script,
    parse_facts,
    planned_sysctls,
    probe_script,
    query_for,
    render,
    to_json,
)
from selfhost.hardening.kernel import SYSCTL_CONF
from selfhost.state import FileState

ROOT = Path(__file__).resolve().parent.parent


def healthy() -> Facts:
    return Facts(release="bookworm", in_container=True, failed=[], disks=[("/", 40, 10)],
                 mem=(4_000_000, 3_000_000), ntp="yes", contents={}, checks={
                     ("https", "https://www.home.arpa/"): "200"},
                 sockets="tcp LISTEN 0 4096 *:443 *:* users:((\"caddy\",pid=2,fd=8))")


def test_a_converged_healthy_host_is_all_good() -> None:
    p = plan()
    found = findings(p, converged(p), healthy())
    assert found == [] and exit_code(found) == EXIT_OK
    assert "all good" in render("nas", found)


def test_drift_is_reported_with_a_diff_of_the_file() -> None:
    p = plan()
    st = converged(p)
    st.files["/etc/issue"] = FileState("0" * 40, "0644", "root", "root")
    facts = healthy()
    facts.contents = {"/etc/issue": b"Debian GNU/Linux 12 \\n \\l\n"}
    [f] = findings(p, st, facts)
    assert (f.severity, f.area, f.what) == ("error", "drift",
                                            "write-file /etc/issue: content differs")
    assert "-Debian GNU/Linux 12" in f.diff and "+Authorised access only" in f.diff
    assert exit_code([f]) == EXIT_FAIL
    data = json.loads(to_json("nas", [f]))
    assert data["exit"] == 2 and data["findings"][0]["area"] == "drift"


def test_health_findings_and_their_severity() -> None:
    p = plan()
    facts = healthy()
    facts.failed = ["caddy.service"]
    facts.disks = [("/", 90, 10), ("/srv", 20, 97)]
    facts.reboot = True
    facts.updates = 3
    facts.checks = {("https", "https://www.home.arpa/"): "000"}
    facts.sockets += "\ntcp LISTEN 0 128 0.0.0.0:6379 0.0.0.0:* users:((\"redis-server\",pid=9,fd=6))"
    found = findings(p, converged(p), facts)
    got = {(f.severity, f.area, f.what) for f in found}
    assert got == {
        ("error", "health", "unit caddy.service has failed"),
        ("warning", "health", "/ is 90% full (10% of its inodes)"),
        ("error", "health", "/srv is 20% full (97% of its inodes)"),
        ("warning", "health", "a reboot is pending (an update needs it)"),
        ("warning", "health", "3 security update(s) pending"),
        ("error", "health", "https check of https://www.home.arpa/ failed (000)"),
        ("warning", "exposure", "6379/tcp on 0.0.0.0 (redis-server) listens, and the model "
                                "does not explain it"),
    }
    assert [f.severity for f in found][:3] == ["error"] * 3  # errors first
    only_warnings = [f for f in found if f.severity == "warning"]
    assert exit_code(only_warnings) == EXIT_WARN


def test_the_script_reads_everything_in_one_go_and_parses_back() -> None:
    p = plan()
    q = query_for([p])
    assert "/etc/ssh/sshd_config" in q.files and "caddy.service" in q.units
    text = health_script([p], {"/etc/issue": b"x\n"})
    for needle in ("VERSION_CODENAME", "systemctl --failed", "df --output", "reboot-required",
                   "NTPSynchronized", "ss -H -tulpn", "/etc/issue", "https://www.home.arpa/"):
        assert needle in text
    facts = parse_facts(["R\tbookworm", "H\tcontainer\t1", "H\tfailed\tx.service",
                         "H\tdisk\t/\t50\t3", "H\tmem\t100\t50", "H\tupdates\t2",
                         "B\t/etc/issue\teA==", "K\ttcp\t127.0.0.1:5232\t1",
                         "L\ttcp LISTEN 0 1 *:22 *:*"])
    assert facts.release == "bookworm" and facts.in_container
    assert facts.failed == ["x.service"] and facts.disks == [("/", 50, 3)]
    assert facts.contents == {"/etc/issue": b"x"} and facts.updates == 2
    assert facts.checks == {("tcp", "127.0.0.1:5232"): "1"}


def test_the_daily_check_knows_every_managed_file_but_no_secret() -> None:
    from selfhost.compile import compile_fleet
    from selfhost.config import load_fleet

    fleet = load_fleet(ROOT / "examples" / "calendars.yaml")
    [p] = compile_fleet(fleet).values()
    rows = [r.split("\t") for r in p.files()["/etc/selfhost/check/expected.tsv"].splitlines()
            if not r.startswith("#")]
    by_path = {r[1]: r for r in rows if r[0] in "FM"}
    planned = {s.file.path for s in p.steps if type(s).__name__ == "File"}
    assert set(by_path) == planned - {"/etc/selfhost/check/expected.tsv"}
    # The Caddyfile holds password hashes: its mode and owner are checked, not its content.
    assert by_path["/etc/caddy/Caddyfile"] == ["M", "/etc/caddy/Caddyfile", "640", "root",
                                               "caddy"]
    assert by_path["/etc/selfhost/backup/usb.password"][0] == "M"
    assert by_path["/etc/radicale/config"][0] == "F"
    assert ["U", "radicale.service"] in rows and ["U", "caddy.service"] in rows


def test_removed_services_are_shown_with_the_data_kept() -> None:
    p = plan()
    facts = parse_facts(["Z\tservices.radicale\t2026-11-30T08:40Z\t/var/lib/radicale/collections"])
    facts.release, facts.in_container, facts.ntp = "bookworm", True, "yes"
    found = findings(p, converged(p), facts)
    assert [(f.severity, f.what) for f in found] == [(
        "info", "services.radicale was removed from the model (2026-11-30T08:40Z); its data "
        "is kept: /var/lib/radicale/collections")]
    assert exit_code(found) == EXIT_OK and "all good" in render("nas", found)


def test_exposure_from_outside() -> None:
    p = plan()  # opens 22, 80, 443 (tcp) to everyone
    found = exposure(p, "10.0.0.2", ["O\t22", "O\t443", "O\t6379"])
    assert [(f.severity, f.what) for f in found] == [
        ("error", "6379/tcp answers on 10.0.0.2 from outside, and the model does not open it"),
        ("warning", "80/tcp does not answer on 10.0.0.2 from outside, though the model opens "
                    "it")]
    text = probe_script("10.0.0.2", sorted(COMMON_PORTS))
    assert "/dev/tcp/10.0.0.2/$p" in text and " 5232 " in text


def test_work_left_by_an_interrupted_deploy_is_drift() -> None:
    p = plan()
    st = converged(p)
    st.pending = {"reload-caddy.service"}
    [f] = findings(p, st, healthy())
    assert (f.severity, f.what) == ("error", "an interrupted or rolled-back deploy left a "
                                             "reload undone "
                                             "(caddy.service)")
    st.pending = set()
    st.staged = {"/etc/caddy/Caddyfile"}
    [f] = findings(p, st, healthy())
    assert (f.severity, f.what) == ("error", "/etc/caddy/Caddyfile.selfhost-new: a staged copy "
                                             "left by an interrupted deploy")


def test_the_daily_check_unit_treats_findings_as_a_report() -> None:
    """Exit 1 and 2 are findings, reported by the script: the unit must not fail for them
    (the next check would report a failed unit, and `systemctl start` would error)."""
    [p] = __import__("selfhost.compile", fromlist=["compile_fleet"]).compile_fleet(
        __import__("selfhost.config", fromlist=["load_fleet"]).load_fleet(
            ROOT / "examples" / "home.yaml")).values()
    unit = p.files()["/etc/systemd/system/selfhost-check.service"]
    assert "SuccessExitStatus=1 2\n" in unit and "Type=oneshot\n" in unit


# --------------------------------------------------------------------------------------------
# Backup age: a repository's last success older than its max_age_hours (issues 13 and 16).

def _calendars_plan() -> object:
    from selfhost.compile import compile_fleet
    from selfhost.config import load_fleet

    [p] = compile_fleet(load_fleet(ROOT / "examples" / "calendars.yaml")).values()
    return p


def _backup_line(p: object, state: Path) -> str:
    text = health_script([p], {}, backup_state=str(state))  # type: ignore[list-item]
    [line] = [ln for ln in text.splitlines() if "K\\tbackup" in ln]
    return line


def _run_backup_check(p: object, state: Path) -> Facts:
    res = subprocess.run(["/bin/sh", "-c", _backup_line(p, state)], capture_output=True,
                         text=True, timeout=10)
    assert res.returncode == 0, res.stderr
    return parse_facts(res.stdout.splitlines())


def test_each_backup_repository_has_an_age_check_from_its_policy() -> None:
    p = _calendars_plan()
    [h] = [h for h in p.health if h.kind == "backup"]  # type: ignore[attr-defined]
    assert (h.target, h.expect, h.origin) == ("usb", "36",
                                              "backup.repositories.0.max_age_hours")
    rows = p.files()["/etc/selfhost/check/expected.tsv"].splitlines()  # type: ignore[attr-defined]
    assert "B\tusb\t36" in rows


@pytest.mark.parametrize(("stamps", "expected"), [
    ({"last-success": 1 * 3600}, set()),
    ({"last-success": 40 * 3600, "since": 90 * 3600},
     {("error", "backup to repository usb is late: last success 40 hours ago (limit 36 h)")}),
    ({"since": 2 * 3600}, set()),  # set up two hours ago, no backup yet: not late yet
    ({"since": 50 * 3600},
     {("error", "backup to repository usb is late: no successful backup for 50 hours "
                "(limit 36 h)")}),
    ({}, {("warning", "the last backup to repository usb is not known (unknown)")}),
], ids=["fresh", "late", "new", "never", "unknown"])
def test_a_late_backup_is_an_error(tmp_path: Path, stamps: dict[str, int],
                                   expected: set[tuple[str, str]]) -> None:
    # The stamps the glue writes (seconds since the epoch), read by the real script.
    now = int(time.time())
    for kind, age in stamps.items():
        (tmp_path / f"usb.{kind}").write_text(f"{now - age}\n")
    p = _calendars_plan()
    facts = _run_backup_check(p, tmp_path)
    assert set(facts.checks or {}) == {("backup", "usb")}
    healthy_facts = Facts(release="bookworm", in_container=True, failed=[], disks=[],
                          mem=(0, 0), contents={}, checks=facts.checks, sockets="")
    found = [f for f in findings(p, converged(p), healthy_facts)  # type: ignore[arg-type]
             if f.area == "health"]
    assert {(f.severity, f.what) for f in found} == expected
    for f in found:
        assert "systemctl start selfhost-backup-usb.service" in f.todo
    if any(sev == "error" for sev, _ in expected):
        assert exit_code(found) == EXIT_FAIL


@pytest.mark.parametrize(("hours", "late"), [(1, False), (37, True)])
def test_the_daily_check_reports_a_late_backup(tmp_path: Path, hours: int, late: bool) -> None:
    from selfhost.hostcheck import script

    backups = tmp_path / "backups"
    backups.mkdir()
    (backups / "usb.last-success").write_text(f"{int(time.time()) - hours * 3600}\n")
    expected = tmp_path / "expected.tsv"
    expected.write_text("# test\nB\tusb\t36\n")
    text = (script(85, "").replace("/etc/selfhost/check/expected.tsv", str(expected))
            .replace("/var/lib/selfhost/check", str(tmp_path / "state"))
            .replace("/var/lib/selfhost-backup", str(backups)))
    assert str(backups) in text  # the real script reads the glue's stamps there
    res = subprocess.run(["bash", "-c", text], capture_output=True, text=True, timeout=30)
    last = (tmp_path / "state" / "last").read_text()
    line = ("error\thealth\tbackup to repository usb is late (no success for 36 hours or "
            "more)")
    assert (line in last.splitlines()) == late, last
    if late:
        assert res.returncode == 2


def test_a_full_tmpfs_counts_but_the_system_runtime_mounts_do_not() -> None:
    """/tmp or a data directory on tmpfs fills up like a disk (podman's --mount type=tmpfs in
    tests/containers/test_faults.py); /run, /dev/shm and the like are the system's."""
    facts = parse_facts(["H\tdisk\t/run\t99\t1", "H\tdisk\t/dev/shm\t100\t1",
                         "H\tdisk\t/run/lock\t100\t3", "H\tdisk\t/tmp\t97\t2",
                         "H\tdisk\t/srv\t100\t1", "H\tdisk\t/running\t96\t1"])
    assert facts.disks == [("/tmp", 97, 2), ("/srv", 100, 1), ("/running", 96, 1)]
    assert "-x tmpfs" not in health_script([plan()], {})
    # GNU df refuses -P with --output ("mutually exclusive"): with it, and its error hidden,
    # neither check ever saw a disk. The command of both checks, run for real here:
    from selfhost.hostcheck import SCRIPT_TEXT

    [cmd] = [ln.strip() for ln in SCRIPT_TEXT.splitlines() if ln.strip().startswith("df ")]
    [line] = [ln for ln in health_script([plan()], {}).splitlines() if ln.startswith("df ")]
    assert line.split(" 2>")[0] == cmd.split(" 2>")[0]
    res = subprocess.run(["sh", "-c", cmd.split(" 2>")[0]], capture_output=True, text=True,
                         timeout=10)
    assert res.returncode == 0 and "/" in res.stdout.split(), res.stderr
    # The daily on-host check filters the same mount points (its awk program, run for real).
    program = SCRIPT_TEXT.split("awk -v max=\"$disk\" '", 1)[1].split("'\n", 1)[0]
    res = subprocess.run(["awk", "-v", "max=85", program], capture_output=True, text=True,
                         input="/run 99 1\n/dev/shm 100 1\n/tmp 97 2\n/ 40 10\n", timeout=10)
    assert res.stdout == "warning\thealth\t/tmp is 97% full (2% of its inodes)\n", res.stderr


def test_kernel_settings_overridden_at_boot_or_changed_since_are_drift() -> None:
    p = plan()
    want = planned_sysctls(p)
    assert want["kernel.sysrq"] == "0" and want["fs.protected_fifos"] == "2"
    st = converged(p)
    facts = healthy()
    facts.sysctl_boot = {"kernel.sysrq": ("0", SYSCTL_CONF),
                         "fs.protected_fifos": ("1", "/usr/lib/sysctl.d/99-z-vendor.conf"),
                         "kernel.kptr_restrict": ("1", SYSCTL_CONF)}  # our file's own drift
    facts.sysctl_now = {"kernel.sysrq": "1", "fs.protected_fifos": "1",
                        "kernel.dmesg_restrict": "1"}
    found = findings(p, st, facts)
    assert [f.what for f in found] == [
        "kernel setting fs.protected_fifos = 1 at boot: /usr/lib/sysctl.d/99-z-vendor.conf "
        "overrides the model's 2",
        "kernel setting kernel.sysrq is 1 now, the model says 0 (changed since boot, e.g. by "
        "sysctl -w)"]
    assert all(f.severity == "error" and f.area == "drift" for f in found)
    assert "hardening.kernel.sysctl_overrides" in found[0].todo
    assert exit_code(found) == EXIT_FAIL
    # The script reads both, and its lines parse back.
    text = health_script([p], {})
    assert "systemd-sysctl --cat-config" in text and " kernel.sysrq " in text
    back = parse_facts(["H\tsysctl-boot\tkernel.sysrq\t1\t/etc/sysctl.d/99-zzz-local.conf",
                        "H\tsysctl-now\tnet.ipv4.ip_forward\t0"])
    assert back.sysctl_boot == {"kernel.sysrq": ("1", "/etc/sysctl.d/99-zzz-local.conf")}
    assert back.sysctl_now == {"net.ipv4.ip_forward": "0"}


def test_the_sysctl_file_sorts_after_every_file_debian_ships() -> None:
    # systemd-sysctl: the last file by name wins, whatever its directory. Debian 12's systemd
    # ships 99-protect-links.conf (fs.protected_fifos = 1), procps 99-sysctl.conf.
    name = SYSCTL_CONF.rsplit("/", 1)[1]
    assert all(name > other for other in ("99-protect-links.conf", "99-sysctl.conf",
                                          "50-pid-max.conf", "10-coredump-debian.conf"))


def test_pending_updates_come_from_apt_s_hook_while_current(tmp_path: Path) -> None:
    # apt's upgrade simulation took 4.5 s of a 5.4 s check (calendars.yaml, loaded machine):
    # the count APT's hook writes after each list update is read instead, while it is newer
    # than dpkg's status and the lists.
    from selfhost.hardening.updates import COUNT_SECURITY_UPDATES, PENDING_CACHE

    [line] = [ln for ln in health_script([plan()], {}).splitlines() if "H\\tupdates" in ln]
    cache, status, lists = tmp_path / "cache", tmp_path / "status", tmp_path / "lists"
    snippet = (line.split(" ) > ", 1)[0].lstrip("( ")
               .replace(PENDING_CACHE, str(cache)).replace("/var/lib/dpkg/status", str(status))
               .replace("/var/lib/apt/lists", str(lists))
               .replace(COUNT_SECURITY_UPDATES, "echo 99"))
    status.write_text("")
    lists.mkdir()
    time.sleep(0.02)
    cache.write_text("3\n")
    run = lambda: subprocess.run(["bash", "-c", snippet], capture_output=True, text=True,  # noqa: E731
                                 check=True).stdout
    assert run() == "H\tupdates\t3\n"
    time.sleep(0.02)
    status.write_text("x")  # a package installed since: the count may be stale
    assert run() == "H\tupdates\t99\n"
    cache.unlink()
    assert run() == "H\tupdates\t99\n"


def test_a_mail_queue_that_does_not_drain_is_a_warning(tmp_path: Path) -> None:
    from selfhost.compose.requests import MAILQUEUE_OLD, HealthCheck

    p = plan()
    p.health.append(HealthCheck("mailqueue", "postfix", "20"))
    st = converged(p)
    facts = healthy()
    facts.checks = {**(facts.checks or {}), ("mailqueue", "postfix"): "20"}
    assert findings(p, st, facts) == []
    facts.checks[("mailqueue", "postfix")] = "57"
    [f] = findings(p, st, facts)
    assert (f.severity, f.what) == ("warning", "57 message(s) have waited more than an hour "
                                               "in postfix's queue (limit 20)")
    line = [ln for ln in health_script([p], {}).splitlines() if "mailqueue" in ln]
    assert line and MAILQUEUE_OLD in line[0]
    # The count itself: messages older than an hour, in any hashed subdirectory.
    spool = tmp_path / "deferred"
    for i, age in enumerate((0, 7200, 7200)):
        f_ = spool / str(i) / f"msg{i}"
        f_.parent.mkdir(parents=True)
        f_.write_text("x")
        os.utime(f_, (time.time() - age, time.time() - age))
    got = subprocess.run(["sh", "-c", MAILQUEUE_OLD.replace("/var/spool/postfix/deferred",
                                                           str(spool))],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert got == "2"
