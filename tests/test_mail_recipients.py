"""First-time recipients per day: the policy script's logic (run on a temporary database, in
process and as Postfix runs it, over stdin/stdout) and how the mail module wires it in."""

from __future__ import annotations

import copy
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from selfhost.compile import Target, compile_fleet
from selfhost.models.fleet import Fleet
from selfhost.services import mail
from selfhost.services import mail_recipients as rcpt
from selfhost.validation import validated

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "mail.yaml"
SCRIPT = ROOT / "selfhost" / "services" / "mail_recipients.py"
LOCAL = frozenset({"example.org", "nas.example.org"})
NOW = 1_800_000_000


def ask(db: sqlite3.Connection, recipient: str, *, login: str = "alice@example.org",
        sender: str = "alice@example.org", now: int = NOW, over: str = "defer",
        per_day: int = 2, state: str = "RCPT") -> str:
    attrs = {"request": "smtpd_access_policy", "protocol_state": state,
             "recipient": recipient, "sender": sender, "sasl_username": login}
    return rcpt.decide(db, attrs, per_day, LOCAL, over, now)


@pytest.fixture
def db(tmp_path: Path) -> sqlite3.Connection:
    return rcpt.connect(str(tmp_path / "r.sqlite"))


def test_new_pairs_pass_until_the_limit_then_defer(db: sqlite3.Connection) -> None:
    assert ask(db, "a@out.test") == "DUNNO"
    assert ask(db, "B@Out.test") == "DUNNO"
    assert ask(db, "c@out.test") == ("450 4.7.1 Outbound limit: alice@example.org may mail 2 "
                                     "first-time recipients per day, try again later")
    # A known pair still passes, whatever the case; the refused one was not recorded.
    assert ask(db, "a@OUT.test") == "DUNNO"
    assert ask(db, "b@out.test") == "DUNNO"
    rows = db.execute("SELECT sender, recipient FROM pairs ORDER BY recipient").fetchall()
    assert rows == [("alice@example.org", "a@out.test"), ("alice@example.org", "b@out.test")]
    # Another user has a count of their own.
    assert ask(db, "c@out.test", login="bob@example.org") == "DUNNO"


def test_the_window_is_24_hours(db: sqlite3.Connection) -> None:
    assert ask(db, "a@out.test") == "DUNNO"
    assert ask(db, "b@out.test", now=NOW + 100) == "DUNNO"
    assert ask(db, "c@out.test", now=NOW + rcpt.DAY - 1).startswith("450 ")
    assert ask(db, "c@out.test", now=NOW + rcpt.DAY) == "DUNNO"  # a@ left the window
    assert ask(db, "d@out.test", now=NOW + rcpt.DAY + 1).startswith("450 ")


def test_local_recipients_and_other_stages_are_not_counted(db: sqlite3.Connection) -> None:
    for r in ("x@example.org", "root@NAS.example.org", "postmaster", "", "x@"):
        assert ask(db, r, per_day=1) == "DUNNO"
    assert ask(db, "a@out.test", per_day=1, state="END-OF-MESSAGE") == "DUNNO"
    assert ask(db, "a@out.test", login="", sender="") == "DUNNO"  # a bounce
    assert db.execute("SELECT count(*) FROM pairs").fetchone() == (0,)


def test_hold_for_local_senders_and_when_asked(db: sqlite3.Connection) -> None:
    held = "HOLD Outbound limit: www-data@nas.example.org may mail 1 first-time recipients"
    assert ask(db, "a@out.test", login="", sender="www-data@nas.example.org", per_day=1) == \
        "DUNNO"
    # No login (the local programs' smtpd): the envelope sender is the key, always held.
    assert ask(db, "b@out.test", login="", sender="WWW-data@nas.example.org",
               per_day=1).startswith(held)
    assert ask(db, "a@out.test", per_day=1, over="hold") == "DUNNO"
    assert ask(db, "b@out.test", per_day=1, over="hold").startswith(
        "HOLD Outbound limit: alice@example.org may mail 1 first-time recipients per day")


def run(db_path: Path, stdin: str, per_day: int = 1) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--db", str(db_path), "--per-day", str(per_day),
         "--domain", "example.org"], input=stdin, capture_output=True, text=True, timeout=30)


def request(recipient: str, **extra: str) -> str:
    attrs = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
             "sasl_username": "alice@example.org", "sender": "alice@example.org",
             "recipient": recipient, **extra}
    return "".join(f"{k}={v}\n" for k, v in attrs.items()) + "\n"


def test_the_protocol_over_stdin(tmp_path: Path) -> None:
    path = tmp_path / "db" / "r.sqlite"
    path.parent.mkdir()
    # Several requests on one connection; a line without '=' is ignored, not fatal.
    out = run(path, request("a@out.test") + "garbage line\n" + request("b@out.test")
              + request("a@out.test"))
    assert out.returncode == 0, out.stderr
    assert out.stdout == ("action=DUNNO\n\naction=450 4.7.1 Outbound limit: alice@example.org "
                          "may mail 1 first-time recipients per day, try again later\n\n"
                          "action=DUNNO\n\n")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    # An incomplete request at the end of the input (no empty line) gets no answer.
    assert run(path, "request=smtpd_access_policy\nrecipient=c@out.test").stdout == ""


def test_a_broken_database_defers_never_lets_through(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sqlite"
    bad.write_text("not a database " * 100)
    out = run(bad, request("a@out.test"))
    assert out.stdout == ("action=451 4.3.0 first-time recipient check unavailable, try again "
                          "later\n\n")
    locked = tmp_path / "locked.sqlite"
    rcpt.connect(str(locked)).close()
    holder = sqlite3.connect(str(locked), isolation_level=None)
    holder.execute("begin exclusive")
    conn = sqlite3.connect(str(locked), timeout=0.1, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError):
        ask(conn, "a@out.test")
    holder.execute("rollback")
    assert ask(conn, "a@out.test") == "DUNNO"  # the failed attempt left no transaction open


def model(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    data["services"]["mail"]["outbound_limits"] = copy.deepcopy(changes)
    return data


def files(data: dict[str, Any]) -> dict[str, str]:
    [plan] = compile_fleet(Fleet.of(validated(data)),
                           {"nas": Target(release="trixie", in_container=True)}).values()
    return dict(plan.files())


def test_the_module_asks_at_rcpt_time_on_submission_and_local_paths() -> None:
    f = files(model(first_time_per_day=7, over_limit="hold"))
    master = f[mail.MASTER_CF]
    check = ("  -o { smtpd_recipient_restrictions = check_policy_service "
             "unix:private/selfhost-recipients }\n")
    assert master.count(check) == 3  # submission (587), submissions (465), local (10026)
    assert "check_policy_service unix" not in master.split("submission inet")[0]  # not 25
    spawn = master.split("selfhost-recipients unix")[1].split("\ncleanup")[0]
    assert ("spawn\n  user=selfhost-mailrcpt argv=/usr/local/lib/selfhost/mail-recipients "
            "--db /var/lib/selfhost-mail-recipients/recipients.sqlite\n") in spawn
    assert "--per-day 7 --over hold" in spawn
    assert spawn.endswith("\n  --domain home.arpa\n  --domain nas.home.arpa")
    assert "selfhost-recipients_time_limit = 3600" in f[mail.MAIN_CF]
    assert f[mail.RECIPIENTS_SCRIPT] == SCRIPT.read_text()
    assert "action=rate" not in f[mail.RECIPIENTS_SCRIPT]


def test_default_and_bad_limit() -> None:
    assert mail.OutboundLimits().first_time_per_day == 100
    with pytest.raises(ValidationError, match="first_time_per_day"):
        validated(model(first_time_per_day=0))
