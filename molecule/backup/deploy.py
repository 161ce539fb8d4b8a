"""Test deploy of the backup scenario: the normal home_server plan (backups included), then
the fleet part (peer accounts, keys).

Test-only additions:
- a tiny "notes" service with an SQLite database whose DataPath has a before_backup dump hook,
  to exercise the consistency hooks with a real database;
- `notify` pointing at an SMTP sink that the tests run on the server's own loopback
  (127.0.0.1:2525), to check that alerts really leave as mail.
"""

from pyinfra.api.exceptions import DeployError
from pyinfra.context import host

import selfhost.compile.compiler as compiler
from selfhost.backend.pyinfra import apply_plan, load, target_for_host
from selfhost.backup import restic
from selfhost.backup.deploy import backup_fleet
from selfhost.compile import compile_server
from selfhost.notify import Notify, SmtpRelay
from selfhost.services.base import Contribution, DataPath, ManagedDir

NOTES_DB = "/var/lib/notes/notes.db"
# pyinfra runs this file once per host: wrap the original collect only once.
_collect = getattr(compiler, "_selfhost_original_collect", compiler.collect)
compiler._selfhost_original_collect = _collect


def _collect_with_backup(server, target):
    out = _collect(server, target)
    at = next(i for i, (name, _) in enumerate(out) if name == "hardening.kernel")
    if server.hostname == "nas":
        notes = Contribution(
            packages=["sqlite3"],
            directories=[ManagedDir("/var/lib/notes", "0750")],
            data=[DataPath("/var/lib/notes", "notes",
                           before_backup=f"sqlite3 -cmd '.timeout 20000' {NOTES_DB} "
                           "'.backup /var/lib/notes/dump.db'")],
        )
        out.insert(at, ("services.notes", notes))
        at += 1
        # The backup contribution (built before this test-only service) must include it.
        b = next(i for i, (name, _) in enumerate(out) if name == "backup")
        data = [d for name, c in out if name != "backup" for d in c.data]
        out[b] = ("backup", restic.contribute(server, target, data))
    return out


compiler.collect = _collect_with_backup

path = host.data.get("selfhost_config")
if not path:
    raise DeployError("set host data selfhost_config")
server = load(path)
if server.hostname == "nas":
    server = server.model_copy(update={"notify": Notify(
        email="alice@example.org", smtp=SmtpRelay(host="127.0.0.1", port=2525, tls="off"))})
apply_plan(compile_server(server, target_for_host()), server)
backup_fleet()
