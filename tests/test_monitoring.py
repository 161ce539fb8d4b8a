"""The monitoring module (Monit): what it watches comes from the other modules' health-check
requests; its scripts are run for real with /bin/sh (Monit's configuration itself is checked
by Debian's `monit -t` in the example-file validator tests)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from selfhost.compile import Target, compile_fleet
from selfhost.compile.plan import File
from selfhost.config import ConfigError, load_fleet_text
from selfhost.services import monitoring

KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIO15aKF3qdwTP7p24+Rliy7SMGYyMZqFPJES7fSwQd7P "
       "alice@laptop")
MODEL = f"""
hostname: nas
domain: home.arpa
admins: [{{name: alice, ssh_keys: ["{KEY}"]}}]
services:
  radicale:
    users: [{{name: alice, password: {{env: DAV_ALICE_PASSWORD}}}}]
  monitoring: {{interval_s: 30, paths: [/srv], outbound_mb_per_minute: 20}}
"""
NOTIFY = """
notify:
  email: alice@example.org
  smtp: {host: smtp.example.org, port: 587, user: nas, password: {env: SMTP_PASSWORD}}
"""


def files(text: str) -> dict[str, str]:
    fleet = load_fleet_text(text, "m.yaml")
    plan = compile_fleet(fleet, {"nas": Target(release="trixie")})["nas"]
    out = {}
    for s in plan.steps:
        if isinstance(s, File) and s.file.path.startswith(("/etc/monit", "/usr/local/sbin/selfhost-monitor")):
            c = s.file.content
            out[s.file.path] = c if isinstance(c, str) else c.decode()
    return out


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAV_ALICE_PASSWORD", "correct horse battery staple, 2026 edition!")
    monkeypatch.setenv("SMTP_PASSWORD", "an smtp relay password that is long enough 42")


def test_every_health_check_of_the_other_modules_is_watched() -> None:
    f = files(MODEL)
    conf = f[monitoring.CONF]
    assert conf.startswith("# Managed by selfhost") and "set daemon 30\n" in conf
    names = [line.split()[2] for line in conf.splitlines() if line.startswith("check program")]
    assert names == ["outbound", "failed-units", "https-dav.home.arpa",
                     "tcp-127.0.0.1-5232", "unit-radicale.service"]
    assert "check filesystem fs-0 with path /\n" in conf
    assert "check filesystem fs-1 with path /srv\n" in conf
    assert f'check program outbound with path "{monitoring.TRAFFIC} 20"' in conf
    # Each check alerts on failure and on recovery (a change of state, not every cycle).
    alert = (f'then exec "{monitoring.ALERT}" else if succeeded then exec '
             f'"{monitoring.ALERT}"')
    rules = [line for line in conf.splitlines() if line.startswith("  if ")]
    assert len(rules) == 10 and all(r.endswith(alert) for r in rules)
    probe = f[monitoring.PROBE]
    assert "systemctl is-active --quiet radicale.service ;;" in probe
    assert "--resolve dav.home.arpa:443:127.0.0.1 https://dav.home.arpa/" in probe


def test_alerts_are_mailed_only_with_the_sendmail_role() -> None:
    assert "if [ 0 = 1 ]" in files(MODEL)[monitoring.ALERT]
    assert "if [ 1 = 1 ]" in files(MODEL + NOTIFY)[monitoring.ALERT]


def test_no_monitoring_without_the_service() -> None:
    assert files(MODEL.replace("  monitoring: {interval_s: 30, paths: [/srv], "
                               "outbound_mb_per_minute: 20}\n", "")) == {}


def test_paths_are_validated_at_their_place() -> None:
    with pytest.raises(ConfigError) as exc:
        load_fleet_text(MODEL.replace("paths: [/srv]", "paths: [srv, '/a b']"), "m.yaml")
    where = [(i.line, i.path) for i in exc.value.issues]
    assert len(where) == 1 and where[0][1] == "services.monitoring.paths"


def sh(script: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(["/bin/sh", str(script), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=30)


def test_the_probe_script_runs_each_probe_by_name(tmp_path: Path) -> None:
    script = tmp_path / "probe"
    script.write_text(files(MODEL)[monitoring.PROBE])
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "systemctl"  # the failed units systemd would list
    fake.write_text("#!/bin/sh\necho 'cron.service loaded failed failed Regular jobs'\n"
                    "echo 'x.service loaded failed failed X'\n")
    fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    res = sh(script, "failed-units", env=env)
    assert res.returncode == 1 and res.stdout.strip() == "failed: cron.service x.service"
    fake.write_text("#!/bin/sh\nexit 0\n")
    assert sh(script, "failed-units", env=env).returncode == 0
    assert sh(script, "nothing-like-this").returncode == 2


def test_the_outbound_probe_measures_bytes_sent_per_minute(tmp_path: Path) -> None:
    script = tmp_path / "outbound"
    script.write_text(monitoring.TRAFFIC_SCRIPT)
    state = tmp_path / "state"
    env = {"SELFHOST_MONITOR_STATE": str(state)}
    first = sh(script, "1", env=env)
    assert first.returncode == 0 and first.stdout.startswith("first sample on "), first
    sent = int(state.read_text().split()[1])
    if sent < 2_000_000:
        pytest.skip("this machine has sent less than 2 MB on its default route")
    # As if nothing had been sent a minute ago: everything sent since boot, in one minute.
    state.write_text(f"{int(state.read_text().split()[0]) - 60} 0\n")
    over = sh(script, "1", env=env)
    assert over.returncode == 1 and "MB/min sent on" in over.stdout
    state.write_text(f"{int(state.read_text().split()[0]) - 60} 0\n")
    assert sh(script, str(sent), env=env).returncode == 0


def test_a_private_ca_certificate_is_judged_by_its_own_lifetime(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Caddy's internal CA issues 12-hour certificates: the web module's certificate health
    check says 1 hour is the limit there (14 days for ACME), and both Monit and `selfhost
    check` use it; a 14-day limit would call every healthy LAN certificate expiring."""
    from selfhost.check import health_script

    monkeypatch.setenv("H_XMPP", "a long xmpp password for alice, 2026 edition!")
    text = MODEL.replace("  radicale:\n", "  xmpp:\n    accounts: [{jid: alice@home.arpa, "
                         "password: {env: H_XMPP}}]\n  radicale:\n")
    probe = files(text)[monitoring.PROBE]
    assert "-servername home.arpa 2>/dev/null | openssl x509 -noout -checkend 3600" in probe
    fleet = load_fleet_text(text, "m.yaml")
    plan = compile_fleet(fleet, {"nas": Target(release="trixie")})["nas"]
    assert [h.expect for h in plan.health if h.kind == "certificate"] == ["3600"]
    assert "-checkend 3600 " in health_script([plan], {})


def test_backup_age_is_watched_from_the_backup_glue_time_stamp(tmp_path: Path) -> None:
    text = MODEL + """
backup:
  repositories:
    - name: usb
      type: local
      path: /var/backups/restic-usb
      password: {env: DAV_ALICE_PASSWORD}
      max_age_hours: 36
"""
    probe = files(text)[monitoring.PROBE]
    assert "  backup-usb)\n" in probe
    script = tmp_path / "probe"
    script.write_text(probe.replace("/var/lib/selfhost-backup/", f"{tmp_path}/"))
    stamp = tmp_path / "usb.last-success"
    assert sh(script, "backup-usb").returncode == 0  # no backup yet: the late timer's job
    stamp.write_text(f"{int(time.time()) - 3600}\n")
    assert sh(script, "backup-usb").returncode == 0
    stamp.write_text(f"{int(time.time()) - 40 * 3600}\n")
    late = sh(script, "backup-usb")
    assert late.returncode == 1 and late.stdout.strip() == "last success 40 hours ago (limit 36 h)"


def test_a_mail_queue_that_does_not_drain_is_watched() -> None:
    svc = monitoring.MonitoringService()
    from selfhost.compose.requests import MAILQUEUE_OLD, HealthCheck

    probes = svc.probes([HealthCheck("mailqueue", "postfix", "20")])
    assert probes["mailqueue-postfix"] == (
        f'n=$({MAILQUEUE_OLD}); echo "$n message(s) waiting for more than an hour (limit 20)"; '
        '[ "$n" -le 20 ]')
    for n, rc in (("20", 0), ("21", 1)):
        cmd = probes["mailqueue-postfix"].replace(MAILQUEUE_OLD, f"echo {n}")
        assert subprocess.run(["sh", "-c", cmd], capture_output=True).returncode == rc
