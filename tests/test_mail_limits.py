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
from limits_stub import limits_script
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
    rules = [line for line in f[mail.POSTFWD_CF].splitlines() if line.startswith("id=")
             and "LOCAL" not in line]
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
    assert master.count(policy) == 3  # submission (587), submissions (465), local (10026)
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
    limits_script(tmp_path, bin_, "nas")
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


def test_local_sendmail_is_counted_per_login_and_held() -> None:
    """pickup hands local mail to a loopback smtpd that asks postfwd (per sender, held over
    a limit) and re-injects it once: no filter, milter or address mapping the second time;
    each login may send only as itself (root and vmail as anyone)."""
    f = files(model(outbound_limits={"per_minute": 3, "per_day": 40}))
    rules = [line for line in f[mail.POSTFWD_CF].splitlines() if "LOCAL" in line]
    assert rules == [
        "id=SELFHOST_LOCAL_MINUTE; protocol_state==END-OF-MESSAGE; server_port==10026; "
        "sender=~/./; action=rate(sender/3/60/HOLD Outbound limit: $$sender may send 3 per "
        "minute, held for the admin)",
        "id=SELFHOST_LOCAL_DAY; protocol_state==END-OF-MESSAGE; server_port==10026; "
        "sender=~/./; action=rate(sender/40/86400/HOLD Outbound limit: $$sender may send 40 "
        "per day, held for the admin)"]
    master = f[mail.MASTER_CF]
    pickup = master.split("pickup    unix")[1].split("\n")
    assert pickup[1] == "  -o content_filter=selfhost-limit:[127.0.0.1]:10026"
    listener = master.split("127.0.0.1:10026 inet")[1].split("\ncleanup")[0]
    assert "  -o content_filter=\n" in listener  # re-injected once: no loop
    assert "no_milters" in listener and "no_address_mappings" in listener
    assert "  -o smtpd_milters=\n" in listener  # signed once, at pickup
    assert "check_policy_service inet:127.0.0.1:10040" in listener
    assert "smtpd_client_restrictions=permit_mynetworks,reject" in listener
    assert ("local_login_sender_maps = inline:{ root=*, postfix=*, vmail=* }, "
            f"regexp:{mail.LOCAL_LOGINS}") in f[mail.MAIN_CF]
    assert f[mail.LOCAL_LOGINS].endswith("/^([a-z_][a-z0-9_.-]*)$/ $1 $1@nas.home.arpa\n")


def test_logged_in_users_are_deferred_or_held_as_the_model_says() -> None:
    assert "/450 4.7.1 Outbound limit" in files(model())[mail.POSTFWD_CF]
    held = files(model(outbound_limits={"over_limit": "hold"}))[mail.POSTFWD_CF]
    assert "rate(sasl_username/30/60/HOLD Outbound limit: $$sasl_username may send 30 per " \
        "minute, held for the admin)" in held
    assert "450 4.7.1" not in held
    with pytest.raises(ValidationError, match="over_limit"):
        validated(model(outbound_limits={"over_limit": "drop"}))


def test_the_alert_names_held_senders_and_their_php_scripts(tmp_path: Path) -> None:
    """A hold logged by the loopback smtpd: the alert counts it per sender and lists the held
    messages per sender with their X-PHP-Originating-Script (stand-ins for postqueue and
    postcat)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "journal"
    (bin_ / "journalctl").write_text(
        f"#!/bin/sh\ncase \"$*\" in *SYSLOG_IDENTIFIER=postfix/local-limit/smtpd*) cat {log};; "
        "esac\n")
    (bin_ / "postqueue").write_text(
        "#!/bin/sh\ncat <<'E'\n-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient---\n"
        "AB12CD34!     412 Mon Nov 30 18:00:00  webform@nas.home.arpa\n"
        "                                         alice@home.arpa\n\n"
        "EF56AB78!     415 Mon Nov 30 18:00:01  webform@nas.home.arpa\n"
        "                                         bob@home.arpa\n\n"
        "1234ABCD      300 Mon Nov 30 18:00:02  root@nas.home.arpa\n"
        "                                         alice@home.arpa\n\n-- 1 Kbytes in 3 Requests.\n"
        "E\n")
    (bin_ / "postcat").write_text(
        "#!/bin/sh\nprintf 'Subject: x\\nX-PHP-Originating-Script: 1001:form.php\\n'\n")
    limits_script(tmp_path, bin_, "nas")
    log.write_text("".join(
        f"Q{i}: hold: END-OF-MESSAGE from localhost[127.0.0.1]: <localhost[127.0.0.1]>: "
        "Outbound limit: webform@nas.home.arpa may send 3 per minute, held for the admin; "
        "from=<webform@nas.home.arpa>\n" for i in range(2)))
    subprocess.run(["sh", str(tmp_path / "run.sh")], env={"PATH": f"{bin_}:/usr/bin:/bin"},
                   check=True)
    sent = (tmp_path / "mail").read_text()
    assert "2 webform@nas.home.arpa\n" in sent
    assert "2 webform@nas.home.arpa script 1001:form.php" in sent
    assert "root@nas.home.arpa" not in sent  # not held: not listed
