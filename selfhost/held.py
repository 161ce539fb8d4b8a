"""``selfhost held``: the mail Postfix holds over an outbound limit, per sender, and what
the admin does with it (release it for delivery, or delete it).

Everything runs on the host through one shell script per call (``postqueue -j`` lists the
queue as JSON lines, ``postcat -hq`` reads a held message's headers for the PHP script
that sent it, ``postsuper -H`` releases and ``postqueue -i`` delivers at once,
``postsuper -d ID hold`` deletes). Queue IDs are checked before they reach a command line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

QUEUE_ID = re.compile(r"^[0-9A-Za-z]{6,32}$")
SCRIPT_HEADER = "X-PHP-Originating-Script"


@dataclass
class Held:
    """One held message."""

    queue_id: str
    sender: str
    recipients: list[str]
    arrival: int
    size: int
    script: str = ""


@dataclass
class HeldMail:
    """The held messages of a host, per sender."""

    messages: list[Held] = field(default_factory=list)

    def by_sender(self) -> dict[str, list[Held]]:
        out: dict[str, list[Held]] = {}
        for m in sorted(self.messages, key=lambda m: (m.sender, m.arrival, m.queue_id)):
            out.setdefault(m.sender, []).append(m)
        return out


def matches(sender: str, user: str | None) -> bool:
    """Whether ``sender`` belongs to ``user``: the whole address, or its local part (a
    local login sends as LOGIN@server)."""
    if user is None:
        return True
    user = user.lower()
    return sender.lower() == user or sender.lower().partition("@")[0] == user


def parse_queue(lines: list[str]) -> list[Held]:
    """The held messages in ``postqueue -j`` output (one JSON object per line)."""
    out = []
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        if entry.get("queue_name") != "hold":
            continue
        out.append(Held(str(entry["queue_id"]), str(entry.get("sender") or "<>"),
                        [str(r.get("address", "")) for r in entry.get("recipients", [])],
                        int(entry.get("arrival_time", 0)), int(entry.get("message_size", 0))))
    return out


def read(run: Callable[[str], list[str]], user: str | None = None) -> HeldMail:
    """The held mail on the host (only ``user``'s when given), with each message's PHP
    script."""
    held = [m for m in parse_queue(run("postqueue -j")) if matches(m.sender, user)]
    if held:
        script = "".join(
            f"printf '%s ' {m.queue_id}; postcat -hq {m.queue_id} 2>/dev/null | sed -n "
            f"'s/^{SCRIPT_HEADER}: *//p' | head -n 1; echo\n"
            for m in held if QUEUE_ID.match(m.queue_id))
        scripts = {}
        for line in run(script):
            qid, _, value = line.partition(" ")
            scripts[qid] = value.strip()
        for m in held:
            m.script = scripts.get(m.queue_id, "")
    return HeldMail(held)


def act(run: Callable[[str], list[str]], mail: HeldMail, release: list[str],
        delete: list[str]) -> list[str]:
    """Release and delete held messages (an ID, or ``all`` of ``mail``); what was done, as
    lines. An ID not held (in ``mail``) is an error, not a silent no-op."""
    held = {m.queue_id for m in mail.messages}
    todo: list[tuple[str, str]] = []
    for what, ids in (("release", release), ("delete", delete)):
        for qid in ids:
            chosen = sorted(held) if qid == "all" else [qid]
            for one in chosen:
                if not QUEUE_ID.match(one) or one not in held:
                    raise ValueError(f"no held message {one!r} (held: "
                                     f"{', '.join(sorted(held)) or 'none'})")
                todo.append((what, one))
    if not todo:
        return []
    script = "set -e\n" + "".join(
        f"postsuper -H {qid} && postqueue -i {qid} && echo released {qid}\n"
        if what == "release" else f"postsuper -d {qid} hold && echo deleted {qid}\n"
        for what, qid in todo)
    return [line for line in run(script) if line.startswith(("released ", "deleted "))]


def render(host: str, mail: HeldMail) -> str:
    """Held mail per sender, for people."""
    import time

    groups = mail.by_sender()
    if not groups:
        return f"{host}: no held mail\n"
    lines = [f"{host}: {len(mail.messages)} held message(s)"]
    for sender, msgs in groups.items():
        scripts = sorted({m.script for m in msgs if m.script})
        lines.append(f"  {sender}: {len(msgs)} held"
                     + (f" (PHP script: {', '.join(scripts)})" if scripts else ""))
        for m in msgs:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(m.arrival))
            lines.append(f"    {m.queue_id}  {when} UTC  {m.size} bytes  to "
                         f"{', '.join(m.recipients)}")
    return "\n".join(lines) + "\n"
