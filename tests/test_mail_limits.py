"""Outbound limits per logged-in user (examples/mail.yaml): postfwd counts each submitted
message per SASL login on the submission ports only, defers over the limit (4xx), and a
timer alerts the admin from Postfix's log."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from selfhost.compile import Target, compile_fleet
from selfhost.compose.requests import HealthCheck
from selfhost.compose.route import route_host
from selfhost.models.fleet import Fleet
from selfhost.services import mail
from selfhost.validation import validated

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "mail.yaml"


def model(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    data["services"]["mail"].update(copy.deepcopy(changes))
    return data


def files(data: dict[str, Any]) -> dict[str, str]:
    [plan] = compile_fleet(Fleet.of(validated(data)),
                           {"nas": Target(release="trixie", in_container=True)}).values()
    return dict(plan.files())


def test_default_limits_per_login_once_per_message() -> None:
    f = files(model())
    rules = [line for line in f[mail.POSTFWD_CF].splitlines() if line.startswith("id=")]
    assert rules == [
        "id=SELFHOST_MINUTE; protocol_state==END-OF-MESSAGE; sasl_username=~/./; "
        "action=rate(sasl_username/30/60/450 4.7.1 Outbound limit: $$sasl_username may send "
        "30 per minute, try again later)",
        "id=SELFHOST_DAY; protocol_state==END-OF-MESSAGE; sasl_username=~/./; "
        "action=rate(sasl_username/500/86400/450 4.7.1 Outbound limit: $$sasl_username may "
        "send 500 per day, try again later)"]
    master = f[mail.MASTER_CF]
    policy = ("  -o { smtpd_end_of_data_restrictions = check_policy_service "
              "inet:127.0.0.1:10040 }\n")
    assert master.count(policy) == 2  # submission (587) and submissions (465)
    smtp = master.split("submission inet")[0]
    assert "check_policy_service" not in smtp  # port 25 (mail from outside) is not counted
    assert "check_policy_service" not in f[mail.MAIN_CF]


def test_limits_follow_the_model() -> None:
    f = files(model(outbound_limits={"per_minute": 3, "per_day": 40}))
    assert "rate(sasl_username/3/60/450" in f[mail.POSTFWD_CF]
    assert "rate(sasl_username/40/86400/450" in f[mail.POSTFWD_CF]
    with pytest.raises(ValidationError, match="per_minute"):
        validated(model(outbound_limits={"per_minute": 0}))


def test_the_alert_timer_and_health_checks() -> None:
    f = files(model())
    assert f[mail.LIMITS_ALERT] == (ROOT / "selfhost" / "services" / "mail-limits.sh").read_text()
    assert f"ExecStart={mail.LIMITS_ALERT}" in f[mail.LIMITS_UNIT]
    assert "OnUnitActiveSec=60" in f[mail.LIMITS_TIMER]
    server = validated(model())
    routed = route_host(Fleet.of(server), "nas", server.modules())
    checks = {(h.kind, h.target) for h in routed.requests[HealthCheck]
              if isinstance(h, HealthCheck)}
    assert {("unit", "postfwd.service"), ("tcp", "127.0.0.1:10040")} <= checks


def test_the_alert_script_reports_who_reached_a_limit(tmp_path: Path) -> None:
    """The script run with stand-ins for journalctl, logger, sendmail and hostname: it mails
    root the users and their deferrals, and says nothing when there were none."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "journal"
    # Postfix's smtpd of the submission services logs as postfix/submission(s)/smtpd.
    (bin_ / "journalctl").write_text(
        "#!/bin/sh\ncase \"$*\" in *SYSLOG_IDENTIFIER=postfix/submission/smtpd\\ "
        f"SYSLOG_IDENTIFIER=postfix/submissions/smtpd*) cat {log};; esac\n")
    (bin_ / "logger").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/logger\n")
    (bin_ / "hostname").write_text("#!/bin/sh\necho nas\n")
    for p in bin_.iterdir():
        p.chmod(0o755)
    script = (ROOT / "selfhost" / "services" / "mail-limits.sh").read_text()
    script = script.replace("/usr/sbin/sendmail", f"tee {tmp_path}/mail >/dev/null; true")
    script = script.replace("/var/lib/selfhost/", f"{tmp_path}/state/")
    (tmp_path / "run.sh").write_text(script)
    env = {"PATH": f"{bin_}:/usr/bin:/bin"}
    log.write_text("ABC: reject: END-OF-MESSAGE from x[10.0.0.3]: 250 2.0.0 fine\n")
    subprocess.run(["sh", str(tmp_path / "run.sh")], env=env, check=True)
    assert not (tmp_path / "mail").exists()
    log.write_text("".join(
        f"Q{i}: reject: END-OF-MESSAGE from x[10.0.0.3]: 450 4.7.1 Outbound limit: "
        f"alice@home.arpa may send 3 per minute, try again later; from=<alice@home.arpa>\n"
        for i in range(2)))
    subprocess.run(["sh", str(tmp_path / "run.sh")], env=env, check=True)
    sent = (tmp_path / "mail").read_text()
    assert sent.startswith("To: root\nSubject: [nas] mail: outbound limit reached\n")
    assert "2 alice@home.arpa" in sent
    assert "2 alice@home.arpa" in (tmp_path / "logger").read_text()
