"""``selfhost held``: the held messages per sender, released or deleted on the host (a
stand-in runner records the scripts it would run there)."""

from __future__ import annotations

import json

import pytest

from selfhost import held

QUEUE = [json.dumps(e) for e in [
    {"queue_name": "hold", "queue_id": "AB12CD34", "arrival_time": 1796061600,
     "message_size": 412, "sender": "webform@nas.home.arpa",
     "recipients": [{"address": "alice@home.arpa"}]},
    {"queue_name": "deferred", "queue_id": "1234ABCD", "arrival_time": 1796061601,
     "message_size": 300, "sender": "root@nas.home.arpa",
     "recipients": [{"address": "x@example.org", "delay_reason": "timeout"}]},
    {"queue_name": "hold", "queue_id": "EF56AB78", "arrival_time": 1796061602,
     "message_size": 415, "sender": "alice@home.arpa",
     "recipients": [{"address": "bob@home.arpa"}]},
]]


class Host:
    def __init__(self) -> None:
        self.scripts: list[str] = []

    def __call__(self, script: str) -> list[str]:
        self.scripts.append(script)
        if script == "postqueue -j":
            return QUEUE
        if "postcat" in script:
            return ["AB12CD34 1001:contact-form.php", "EF56AB78 "]
        return [f"{'released' if 'postsuper -H' in line else 'deleted'} {line.split()[2]}"
                for line in script.splitlines()[1:]]


def test_lists_held_mail_per_sender_with_the_php_script() -> None:
    run = Host()
    mail = held.read(run)
    assert [m.queue_id for m in mail.messages] == ["AB12CD34", "EF56AB78"]  # not deferred
    text = held.render("nas", mail)
    assert "nas: 2 held message(s)" in text
    assert "  webform@nas.home.arpa: 1 held (PHP script: 1001:contact-form.php)" in text
    assert "    AB12CD34  2026-11-30 18:00:00 UTC  412 bytes  to alice@home.arpa" in text
    assert "  alice@home.arpa: 1 held\n" in text
    only = held.read(Host(), "webform")
    assert [m.sender for m in only.messages] == ["webform@nas.home.arpa"]
    assert held.render("nas", held.HeldMail()) == "nas: no held mail\n"


def test_release_and_delete_run_postsuper_on_held_ids_only() -> None:
    run = Host()
    mail = held.read(run)
    done = held.act(run, mail, ["AB12CD34"], ["EF56AB78"])
    assert done == ["released AB12CD34", "deleted EF56AB78"]
    assert run.scripts[-1] == ("set -e\npostsuper -H AB12CD34 && postqueue -i AB12CD34 && "
                               "echo released AB12CD34\npostsuper -d EF56AB78 hold && echo "
                               "deleted EF56AB78\n")
    assert held.act(run, held.read(run, "alice"), [], ["all"]) == ["deleted EF56AB78"]
    for bad in ("1234ABCD", "AB12CD34; rm -rf /", "nope"):  # not held, or not an ID
        with pytest.raises(ValueError, match="no held message"):
            held.act(run, mail, [bad], [])
    assert held.act(run, mail, [], []) == []
