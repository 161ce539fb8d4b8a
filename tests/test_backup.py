"""Fast checks of the backup model and of what it renders (no target needed)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from selfhost.backup import cli, fleet, restic
from selfhost.backup.glue import GLUE
from selfhost.compile import compile_fleet
from selfhost.compile.target import Target
from selfhost.compose.keys import FakeKeyStore, ensure_keypair
from selfhost.compose.module import Contribution, Env
from selfhost.compose.requests import BackupSource
from selfhost.config import load_fleet
from selfhost.models.backup import BackupPolicy, Repository, Retention
from selfhost.models.fleet import Fleet
from selfhost.models.server import Server

REPO = Path(__file__).resolve().parents[1]
SECRETS = {"SELFHOST_BACKUP_USB_PASSWORD": "usb-secret-123",
           "SELFHOST_BACKUP_FRIEND_PASSWORD": "friend-secret-456"}


@pytest.fixture
def the_fleet() -> Fleet:
    return load_fleet(REPO / "examples" / "backup.yaml")


@pytest.fixture
def server(the_fleet: Fleet) -> Server:
    return the_fleet.hosts["nas"]


DATA = [
    BackupSource("/var/lib/notes",
                 before="sqlite3 /var/lib/notes/n.db '.backup /var/lib/notes/d.db'",
                 stop_units=("notes.service",), origin="services.notes"),
    BackupSource("/var/lib/caddy", origin="services.web"),
]


def contribute(server: Server, data: list[BackupSource] = DATA) -> Contribution:
    """The backup module's contribution, given these incoming backup sources (in the example
    fleet, where the friend's host is)."""
    fl = load_fleet(REPO / "examples" / "backup.yaml")
    fl.hosts[server.hostname] = server
    env = Env(server=server, host=server.hostname, fleet=fl, path="backup", target=Target(),
              keys=FakeKeyStore(), routed={BackupSource: list(data)})
    return restic.contribute(env)


def test_examples_validate(the_fleet: Fleet) -> None:
    assert sorted(the_fleet.hosts) == ["friend", "nas"]


def test_default_policy_is_off_and_contributes_nothing(server: Server) -> None:
    assert not BackupPolicy().active
    server.backup = BackupPolicy()
    c = contribute(server)
    assert not c.files and not c.units and not c.packages


@pytest.mark.parametrize("bad", [
    {"name": "x", "type": "local", "path": "relative", "password": {"env": "P"}},
    {"name": "x", "type": "sftp", "password": {"env": "P"}},
    {"name": "x", "type": "sftp", "host": "h", "user": "u", "path": "/r",
     "password": {"env": "P"}},  # no host_key: would trust on first use
    {"name": "x", "type": "rest", "url": "ftp://x", "password": {"env": "P"}},
    {"name": "x", "type": "rclone", "remote": "nocolon", "password": {"env": "P"}},
    {"name": "x", "type": "local", "path": "/r", "password": "plaintext"},
    {"name": "x", "type": "local", "path": "/r$(reboot)", "password": {"env": "P"}},
    {"name": "Bad_Name", "type": "local", "path": "/r", "password": {"env": "P"}},
    {"name": "x", "type": "local", "path": "/r", "url": "https://x", "password": {"env": "P"}},
    {"name": "x", "type": "local", "path": "/r", "schedule": "daily; rm", "password": {"env": "P"}},
])
def test_repository_rejects(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Repository.model_validate(bad)


def test_retention_must_keep_something_and_renders_flags() -> None:
    with pytest.raises(ValidationError):
        Retention(daily=0, weekly=0, monthly=0, yearly=0)
    assert Retention(keep_within="2d", hourly=0, daily=3, weekly=0, monthly=0,
                     yearly=0).forget_args() == ["--keep-within", "2d", "--keep-daily", "3"]


def test_duplicate_repository_names() -> None:
    r = {"name": "a", "type": "local", "path": "/r", "password": {"env": "P"}}
    with pytest.raises(ValidationError, match="unique"):
        BackupPolicy.model_validate({"repositories": [r, r]})


def test_units_and_timers(server: Server) -> None:
    c = contribute(server)
    files = {f.path: f for f in c.files}
    timer = files["/etc/systemd/system/selfhost-backup-usb.timer"].content
    assert "OnCalendar=*-*-* 02:30" in timer and "Persistent=true" in timer
    assert "RandomizedDelaySec=3600" in timer and "WantedBy=timers.target" in timer
    assert files["/etc/systemd/system/selfhost-backup-usb.timer"].validate == \
        "systemd-analyze calendar '*-*-* 02:30' >/dev/null"
    svc = files["/etc/systemd/system/selfhost-backup-friend.service"].content
    assert "ExecStart=/usr/local/sbin/selfhost-backup run friend" in svc
    assert "OnFailure=selfhost-backup-alert@%n.service" in svc
    check = files["/etc/systemd/system/selfhost-backup-check-friend.service"].content
    assert "selfhost-backup check friend" in check
    assert "OnCalendar=hourly" in files["/etc/systemd/system/selfhost-backup-late.timer"].content
    units = {u.name for u in c.units}
    assert units == {"selfhost-backup-late.timer", "selfhost-backup-usb.timer",
                     "selfhost-backup-check-usb.timer", "selfhost-backup-friend.timer",
                     "selfhost-backup-check-friend.timer"}
    reload = [cmd for cmd in c.commands if cmd.command == "systemctl daemon-reload"]
    assert reload and "/etc/systemd/system/selfhost-backup-usb.service" in reload[0].on_change
    assert "restic" in c.packages and "openssh-client" in c.packages


def test_env_and_data_files(server: Server) -> None:
    files = {f.path: f for f in contribute(server).files}
    env = files["/etc/selfhost/backup/usb.env"].content
    assert 'RESTIC_REPOSITORY="/var/backups/restic-usb"' in env
    assert 'RESTIC_PASSWORD_FILE="/etc/selfhost/backup/usb.password"' in env
    assert ('SELFHOST_FORGET="--keep-within 2d --keep-daily 7 --keep-weekly 4 '
            '--keep-monthly 6"') in env
    fenv = files["/etc/selfhost/backup/friend.env"].content
    assert 'RESTIC_REPOSITORY="sftp:selfhost-backup-friend:/data/restic"' in fenv
    assert 'SELFHOST_CHECK_SUBSET="10%"' in fenv and 'SELFHOST_MAX_AGE_HOURS="48"' in fenv
    sshc = files["/etc/selfhost/backup/friend.ssh_config"].content
    assert "HostName 203.0.113.7" in sshc and "Port 2222" in sshc and "User backup-nas" in sshc
    assert "StrictHostKeyChecking yes" in sshc
    assert files["/etc/selfhost/backup/include.txt"].content == \
        "/var/lib/notes\n/var/lib/caddy\n/srv/extra\n"
    assert files["/etc/selfhost/backup/exclude.txt"].content == "*.tmp\n"
    assert files["/etc/selfhost/backup/stop-units.txt"].content == "notes.service\n"
    assert "sqlite3 /var/lib/notes/n.db" in files["/etc/selfhost/backup/pre-backup.sh"].content
    assert "notes\t/var/lib/notes\n" in files["/etc/selfhost/backup/services.txt"].content
    pw = files["/etc/selfhost/backup/usb.password"]
    assert pw.secret is not None and pw.mode == "0600" and pw.owner == "root" and not pw.content
    for f in files.values():
        if f.path.startswith("/etc/selfhost/backup/"):
            assert f.mode == "0600", f.path


def test_no_secret_in_any_rendered_file_or_command(server: Server,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    c = contribute(server)
    rendered = [f.content for f in c.files] + [cmd.command for cmd in c.commands] + [GLUE]
    rendered += [str(u) for u in c.units]
    for text in rendered:
        for secret in SECRETS.values():
            assert secret not in text
    # The password is only ever read from a file: never on restic's command line.
    assert "--password " not in GLUE and "RESTIC_PASSWORD=" not in GLUE
    for f in c.files:
        if "ExecStart" in f.content:
            assert "password" not in f.content.lower()


def test_glue_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", "/dev/stdin"], input=GLUE.encode(), check=True)


def test_peer_relation_routed_to_the_friend(the_fleet: Fleet) -> None:
    """The client's repository (`peer: friend`) becomes the friend's account in the friend's
    own plan, with the client's public key from the key store; the client gets its private
    key (a secret file) and a known_hosts entry read from the friend at deploy time."""
    keys = FakeKeyStore()
    plans = compile_fleet(the_fleet, keys=keys)
    friend = plans["friend"].files()
    pub = keys.public_key(str(fleet.key_path(the_fleet.hosts["nas"],
                                             the_fleet.hosts["nas"].backup.repositories[1])))
    assert friend["/etc/ssh/selfhost-backup-keys/backup-nas"] == \
        f'restrict,command="internal-sftp" {pub}\n'
    assert "Match User backup-nas" in friend[fleet.SSHD_DROPIN]
    nas = {s.file.path: s.file for s in plans["nas"].steps if hasattr(s, "file")}
    assert nas["/etc/selfhost/backup/friend.key"].secret_file is not None
    assert nas["/etc/selfhost/backup/friend.known_hosts"].host_key_of == \
        ("friend", "203.0.113.7", 2222)
    assert fleet.SSHD_DROPIN not in plans["nas"].files()


def test_peer_receiver_side() -> None:
    c = fleet.receiver_contribution([fleet.PeerClient("nas", "friend", "ssh-ed25519 AAAAkey x")])
    files = {f.path: f.content for f in c.files}
    drop = files[fleet.SSHD_DROPIN]
    assert drop.startswith("# Managed") and "AllowUsers backup-nas\n" in drop
    for line in ("Match User backup-nas", "ChrootDirectory /srv/backup-peers/nas",
                 "ForceCommand internal-sftp", "AuthenticationMethods publickey",
                 "AuthorizedKeysFile /etc/ssh/selfhost-backup-keys/%u"):
        assert line in drop
    assert files["/etc/ssh/selfhost-backup-keys/backup-nas"] == \
        'restrict,command="internal-sftp" ssh-ed25519 AAAAkey x\n'
    dirs = {d.path: d for d in c.directories}
    assert dirs["/srv/backup-peers/nas"].owner == "root"
    assert dirs["/srv/backup-peers/nas/data"].owner == "backup-nas"
    assert any("useradd" in cmd.command and "nologin" in cmd.command for cmd in c.commands)
    assert fleet.known_hosts_line("127.0.0.1", 2222, "ssh-ed25519 AAAAhost root@f") == \
        "[127.0.0.1]:2222 ssh-ed25519 AAAAhost\n"
    assert not fleet.receiver_contribution([]).files


def test_keypair_generated_once(tmp_path: Path) -> None:
    p = tmp_path / "keys" / "nas-friend"
    pub = ensure_keypair(p)
    assert pub.startswith("ssh-ed25519 ") and ensure_keypair(p) == pub
    assert oct(p.stat().st_mode & 0o777) == "0o600"
    assert oct(p.parent.stat().st_mode & 0o777) == "0o700"


def test_status_parsing_and_restore_argv() -> None:
    snap = [{"time": "2024-05-01T10:00:00.123456789+00:00", "id": "ab" * 32,
             "short_id": "abababab"}]
    now = 1714521600 + 13 * 3600  # 2024-05-01T13:00Z
    out = f"usb\t{now}\t{now - 3600}\tok\t{json.dumps(snap)}\nfriend\t{now}\t-\terror\tno route\n"
    rows = cli.parse_status(out)
    assert rows[0]["snapshot"] == "abababab" and rows[0]["age_hours"] == 3.0
    assert rows[0]["last_success_hours"] == 1.0
    assert cli._parse_time("2024-05-01T12:00:00.123456789+02:00").timestamp() == \
        1714557600.123456
    assert rows[1]["ok"] is False and rows[1]["error"] == "no route"
    assert "3.0 h" in cli.format_status(rows) and "unreachable" in cli.format_status(rows)
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_subcommands(parser.add_subparsers())
    args = parser.parse_args(["restore", "podman:x", "usb", "abc", "--path", "/srv/extra"])
    assert cli.restore_argv(args, []) == [cli.GLUE, "restore", "usb", "abc",
                                          "/var/tmp/selfhost-restore/abc", "/srv/extra"]
    assert cli.remote_argv("podman:x", ["a"]) == ["podman", "exec", "x", "a"]


def test_radicale_dump_waits_for_radicale_writers_and_never_creates_its_lock(
        tmp_path: Path) -> None:
    """Radicale's consistency hook, run for real with /bin/sh on a scratch storage: without a
    lock file (Radicale never wrote) it copies and creates none; with a writer holding the
    lock exclusively, it waits for it and copies the writer's finished state."""
    import time

    from selfhost.services import radicale

    coll, dump = tmp_path / "collections", tmp_path / "dump"
    cmd = radicale.dump_command().replace(radicale.COLLECTIONS, str(coll)).replace(
        radicale.DUMP, str(dump))
    (coll / "collection-root" / "alice").mkdir(parents=True)
    (coll / "collection-root" / "alice" / "a.ics").write_text("one")
    subprocess.run(["/bin/sh", "-eu", "-c", cmd], check=True)
    assert (dump / "collections" / "collection-root" / "alice" / "a.ics").read_text() == "one"
    assert not (coll / ".Radicale.lock").exists()
    assert oct(dump.stat().st_mode & 0o777) == "0o700"

    (coll / ".Radicale.lock").touch()
    writer = subprocess.Popen(["flock", "-x", str(coll / ".Radicale.lock"), "sh", "-c",
                               f"sleep 1; echo two > {coll}/collection-root/alice/a.ics"])
    time.sleep(0.3)  # the writer holds the lock
    t0 = time.monotonic()
    subprocess.run(["/bin/sh", "-eu", "-c", cmd], check=True)
    waited = time.monotonic() - t0
    writer.wait(timeout=10)
    assert waited > 0.4
    assert (dump / "collections" / "collection-root" / "alice" / "a.ics").read_text() == "two\n"
    assert not (dump / "collections.new").exists()


@pytest.mark.parametrize("key", ["", " ", "\u0085", "ssh-ed25519", "AAAAC3Nz", "ssh-ed25519 !!"])
def test_an_sftp_host_key_must_be_a_key(key: str) -> None:
    from selfhost.models.backup import Repository

    with pytest.raises(ValueError, match="a public host key"):
        Repository.model_validate({"name": "far", "type": "sftp", "host": "h", "user": "u",
                                   "path": "p", "password": {"env": "P"}, "host_key": key})
    ok = Repository.model_validate({
        "name": "far", "type": "sftp", "host": "h", "user": "u", "path": "p",
        "password": {"env": "P"}, "host_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJHFuxSY "
        "root@far"})
    assert ok.host_key is not None
