#!/usr/bin/python3
# Managed by selfhost: changes here are overwritten on the next deploy.
"""First-time recipients per day: a Postfix policy service (run by spawn(8), one process per
smtpd connection, as an unprivileged user).

Postfix asks at RCPT time (the policy delegation protocol: ``name=value`` lines, an empty
line, then one ``action=...`` answer). For a recipient outside the server's mail domains, the
sender is a logged-in user (``sasl_username``, the submission ports) or, without a login,
the envelope sender (the loopback smtpd of the local programs' mail, where the sender is
pinned to the Unix login). A (sender, recipient) pair seen before passes (``DUNNO``); a new
one is recorded with its time and passes, unless the sender already has ``--per-day`` new
recipients in the last 24 hours: then the answer is the over-limit action (a 4xx deferral,
or ``HOLD``; always ``HOLD`` for a local sender), with a text naming the sender that the
admin's alert (``selfhost-mail-limits``) picks up from Postfix's log. On a database error
(locked too long, unwritable) the answer is a 4xx deferral: never let a recipient through
uncounted. Python's standard library only (Debian's ``python3``).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import time
from typing import TextIO

DAY = 86400
LIMIT_TEXT = "Outbound limit"
SCHEMA = ("CREATE TABLE IF NOT EXISTS pairs (sender TEXT NOT NULL, recipient TEXT NOT NULL, "
          "first_seen INTEGER NOT NULL, PRIMARY KEY (sender, recipient)) WITHOUT ROWID")
INDEX = "CREATE INDEX IF NOT EXISTS pairs_recent ON pairs (sender, first_seen)"


def connect(path: str) -> sqlite3.Connection:
    """Open (and create) the database; writers wait up to 10 s for each other's lock."""
    db = sqlite3.connect(path, timeout=10, isolation_level=None)
    db.execute(SCHEMA)
    db.execute(INDEX)
    return db


def decide(db: sqlite3.Connection, attrs: dict[str, str], per_day: int,
           domains: frozenset[str], over: str, now: int,
           limits: dict[str, int] | None = None) -> str:
    """The answer (the text after ``action=``) for one policy request; ``limits``: senders
    (a login, or a local login's sender) with a daily limit of their own."""
    if attrs.get("protocol_state", "RCPT").upper() != "RCPT":
        return "DUNNO"
    recipient = attrs.get("recipient", "").strip().lower()
    domain = recipient.rpartition("@")[2]
    if "@" not in recipient or not domain or domain in domains:
        return "DUNNO"  # a local recipient (or none): not outbound mail
    login = attrs.get("sasl_username", "").strip().lower()
    sender = login or attrs.get("sender", "").strip().lower()
    if not sender:
        return "DUNNO"  # a bounce (null sender) is not someone's new correspondent
    per_day = (limits or {}).get(sender, per_day)
    db.execute("begin immediate")  # count and insert as one step for concurrent processes
    try:
        if db.execute("SELECT 1 FROM pairs WHERE sender = ? AND recipient = ?",
                      (sender, recipient)).fetchone():
            answer = "DUNNO"
        else:
            (recent,) = db.execute("SELECT count(*) FROM pairs WHERE sender = ? AND "
                                   "first_seen > ?", (sender, now - DAY)).fetchone()
            if recent >= per_day:
                text = f"{LIMIT_TEXT}: {sender} may mail {per_day} first-time recipients per day"
                answer = (f"450 4.7.1 {text}, try again later" if login and over == "defer"
                          else f"HOLD {text}, held for the admin")
            else:
                db.execute("INSERT INTO pairs VALUES (?, ?, ?)", (sender, recipient, now))
                answer = "DUNNO"
        db.execute("commit")
    except BaseException:
        db.execute("rollback")
        raise
    return answer


def serve(db_path: str, per_day: int, domains: frozenset[str], over: str,
          stdin: TextIO, stdout: TextIO, limits: dict[str, int] | None = None) -> None:
    """Answer requests until Postfix closes the connection."""
    db: sqlite3.Connection | None = None
    attrs: dict[str, str] = {}
    for raw in stdin:
        line = raw.rstrip("\r\n")
        if line:
            name, sep, value = line.partition("=")
            if sep:  # a line without '=' is not an attribute: ignored
                attrs[name] = value
            continue
        try:
            if db is None:
                db = connect(db_path)
            answer = decide(db, attrs, per_day, domains, over, int(time.time()), limits)
        except sqlite3.Error:
            answer = "451 4.3.0 first-time recipient check unavailable, try again later"
        stdout.write(f"action={answer}\n\n")
        stdout.flush()
        attrs = {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--db", required=True, help="the SQLite database of (sender, recipient)")
    p.add_argument("--per-day", type=int, required=True, help="new recipients per 24 hours")
    p.add_argument("--over", choices=("defer", "hold"), default="defer",
                   help="a logged-in user over the limit: deferred (4xx) or held")
    p.add_argument("--domain", action="append", default=[], help="a local mail domain")
    p.add_argument("--limit", action="append", default=[], metavar="SENDER=N",
                   help="a sender with a daily limit of its own")
    args = p.parse_args(argv)
    limits = {k.lower(): int(v) for k, _, v in (a.rpartition("=") for a in args.limit)}
    os.umask(0o077)  # the database: readable by this user only (0600)
    serve(args.db, args.per_day, frozenset(d.lower() for d in args.domain), args.over,
          sys.stdin, sys.stdout, limits)
    return 0


if __name__ == "__main__":
    sys.exit(main())
