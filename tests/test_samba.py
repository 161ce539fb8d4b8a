"""The Samba (NAS) module: model rules at their model paths, what it requests of the others,
the rendered smb.conf (pinned, both releases), and, in a Debian container of each release
with Debian's Samba, its own checks: testparm on the file, the password import with pdbedit,
the fail2ban filter on smbd's real log lines."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from validators import Validators

from selfhost.backend import pyinfra as backend
from selfhost.compile import Target, compile_fleet
from selfhost.compose.requests import BackupSource, Jail, Port, SystemUser
from selfhost.compose.resources import SECRET_MARK, SecretPiece
from selfhost.config import load_fleet
from selfhost.models.base import SecretRef
from selfhost.models.fleet import Fleet
from selfhost.models.ntlm import md4, nt_hash
from selfhost.services.samba import CONFIG, JAIL_FILTER, USERS_FILE
from selfhost.validation import ModelError, validated

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "nas.yaml"
PINNED = ROOT / "tests" / "fixtures" / "samba" / "smb.conf"
RELEASES = ("bookworm", "trixie")


def model(**samba: Any) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    data["services"]["samba"].update(copy.deepcopy(samba))
    return data


def plan_of(data: dict[str, Any] | None = None, release: str = "bookworm",
            in_container: bool = True) -> Any:
    fleet = load_fleet(EXAMPLE) if data is None else Fleet.of(validated(data))
    [plan] = compile_fleet(fleet, {"nas": Target(release=release,  # type: ignore[arg-type]
                                                 in_container=in_container)}).values()
    return plan


def file_of(plan: Any, path: str) -> Any:
    return next(s.file for s in plan.steps if type(s).__name__ == "File" and s.file.path == path)


# ------------------------------------------------------------------------------ NT hash


def test_md4_matches_the_rfc_1320_test_suite() -> None:
    assert md4(b"").hex() == "31d6cfe0d16ae931b73c59d7e0c089c0"
    assert md4(b"a").hex() == "bde52cb31de33e46245e05fbdbd6fb24"
    assert md4(b"abc").hex() == "a448017aaf21d8525fc10ae87aa6729d"
    assert md4(b"message digest").hex() == "d9130a8164549fe818874806e1c7014b"
    assert md4(b"abcdefghijklmnopqrstuvwxyz").hex() == "d79e1c308aa5bbcdeea8ed63df412da9"
    assert md4(b"1234567890" * 8).hex() == "e33b4ddc9c38f2199c3e7b164fcc0536"


def test_nt_hash_of_a_known_password() -> None:
    assert nt_hash("password") == "8846F7EAEE8FB117AD06BDD830B7586C"
    assert nt_hash("") == "31D6CFE0D16AE931B73C59D7E0C089C0"


def test_the_backend_fills_nt_hashes_in_at_deploy_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SELFHOST_TEST_NAS", "password")
    piece = SecretPiece(SecretRef(env="SELFHOST_TEST_NAS"), "nt-hash")
    assert backend._secret_value(piece, None) == "8846F7EAEE8FB117AD06BDD830B7586C"  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ the plan


@pytest.mark.parametrize("release", RELEASES)
def test_rendered_smb_conf_is_pinned(release: str) -> None:
    """The whole smb.conf of the example, the same on both releases (Samba 4.17 and 4.22
    read the same options). Update tests/fixtures/samba/smb.conf after an intended change."""
    assert file_of(plan_of(release=release), CONFIG).content == PINNED.read_text()


def test_a_short_stop_timeout_for_smbd_in_containers_only() -> None:
    """In a container systemd may wait for a cgroup-empty event that never comes after
    smbd's stop (90 s per restart): there, and only there, the stop times out after 5 s."""
    dropin = "/etc/systemd/system/smbd.service.d/selfhost-container.conf"
    assert "TimeoutStopSec=5\n" in file_of(plan_of(), dropin).content
    with pytest.raises(StopIteration):
        file_of(plan_of(in_container=False), dropin)


def test_the_example_composes_firewall_users_backups_jail_and_checks() -> None:
    plan = plan_of()
    conf = file_of(plan, CONFIG)
    assert conf.validate is not None and "testparm -s {path}" in conf.validate
    assert conf.mode == "0644" and not conf.secrets
    rules = plan.files()["/etc/nftables.conf"]
    assert 'ip saddr @lan4 tcp dport 445 accept comment "samba"' in rules
    assert "tcp dport 445 accept" not in rules.replace("@lan4 tcp dport 445", "") \
        .replace("@lan6 tcp dport 445", "")  # LAN only, never from anywhere
    jail = plan.files()["/etc/fail2ban/jail.local"]
    assert "[samba]\nenabled = true\nport = 445\nfilter = selfhost-samba\n" \
        "journalmatch = SYSLOG_IDENTIFIER=smbd" in jail
    assert plan.files()["/etc/fail2ban/filter.d/selfhost-samba.conf"] == JAIL_FILTER
    assert {"/srv/nas/family", "/srv/nas/carol"} <= {d.path for d in plan.data}
    dirs = {s.dir.path: s.dir for s in plan.steps if type(s).__name__ == "Directory"}
    assert (dirs["/srv/nas/family"].mode, dirs["/srv/nas/family"].group) == ("2770",
                                                                            "smb-family")
    runs = {s.command.name: s.command for s in plan.steps if type(s).__name__ == "Run"}
    assert "usermod -aG smb-carol,smb-family carol" in \
        runs["system user carol (services.samba.users.0)"].command
    assert "usermod -aG smb-family erin" in runs["system user erin (services.samba.users.2)"].command
    assert runs["samba: password database (tdbsam) from the model's users"].on_change == \
        (USERS_FILE,)
    assert "samba" in next(s.names for s in plan.steps if type(s).__name__ == "Packages")


def test_passwords_are_nt_hashes_filled_in_at_deploy_time_in_a_root_only_file() -> None:
    plan = plan_of()
    users = file_of(plan, USERS_FILE)
    assert (users.mode, users.owner) == ("0600", "root")
    assert [p.transform for p in users.secrets] == ["nt-hash"] * 3
    assert [p.ref.env for p in users.secrets] == ["NAS_CAROL_PASSWORD", "NAS_DAVE_PASSWORD",
                                                  "NAS_ERIN_PASSWORD"]
    assert users.content.splitlines()[0] == (
        f"carol:0:{'X' * 32}:{SECRET_MARK.format(0)}:[UX         ]:LCT-60000000:")
    # Nothing about a password in the commands: the import reads the file.
    for s in plan.steps:
        if type(s).__name__ == "Run":
            assert "NAS_" not in s.command.command and SECRET_MARK[:10] not in s.command.command


def test_requests_name_their_model_paths() -> None:
    from selfhost.compose.module import Env
    from selfhost.services.samba import SambaService

    server = validated(model())
    svc = server.services.samba
    assert isinstance(svc, SambaService)
    reqs = svc.requests(Env(server=server, host="nas", fleet=Fleet.of(server),
                            path="services.samba"))
    port = next(r for r in reqs if isinstance(r, Port))
    assert (port.port, port.zone, port.origin) == (445, "lan", "services.samba.zone")
    assert [(u.name, u.groups) for u in reqs if isinstance(u, SystemUser)] == [
        ("carol", ("smb-carol", "smb-family")), ("dave", ("smb-family",)),
        ("erin", ("smb-family",))]
    assert [b.path for b in reqs if isinstance(b, BackupSource)] == ["/srv/nas/family",
                                                                      "/srv/nas/carol"]
    assert any(isinstance(j, Jail) and j.name == "samba" for j in reqs)


def test_vpn_zone_and_an_admin_as_a_user() -> None:
    data = model(zone="vpn", users=[{"name": "alice", "password": {"env": "A"}}],
                 shares=[{"name": "alice", "valid_users": ["alice"], "write_list": ["alice"]}])
    data["services"]["wireguard"] = {"peers": []}
    plan = plan_of(data)
    assert "ip saddr @vpn4 tcp dport 445 accept" in plan.files()["/etc/nftables.conf"]
    runs = {s.command.name: s.command for s in plan.steps if type(s).__name__ == "Run"}
    # The admin's own account (made in the admins phase), not a system user.
    assert not any(n.startswith("system user alice") for n in runs)
    cmd = runs["samba: admin alice in smb-alice"]
    assert cmd.late and cmd.command == "usermod -aG smb-alice alice"
    assert "services.samba.users.0.name: user alice is also an admin: the shares use the " \
        "admin's account" in plan.notices


def test_a_guest_share_needs_a_reason_and_reads_only() -> None:
    data = model(shares=[{"name": "public", "guest": {"reason": "the family's music, for the "
                                                      "living-room player"},
                          "write_list": ["carol"]}])
    conf = file_of(plan_of(data), CONFIG).content
    assert "map to guest = bad user" in conf
    section = conf.split("[public]")[1]
    assert "guest ok = yes" in section and "read only = yes" in section
    assert "valid users" not in section and "write list = carol" in section
    assert "# Open to guests (read only): the family's music" in section
    assert "map to guest = never" in file_of(plan_of(), CONFIG).content
    with pytest.raises(ValidationError, match="reason"):
        validated(model(shares=[{"name": "public", "guest": {}}]))


@pytest.mark.parametrize("samba,loc,message", [
    ({"shares": [{"name": "x", "valid_users": ["carol", "mallory"]}]},
     "services.samba.shares.0.valid_users.1", "mallory is not a user of services.samba.users"),
    ({"shares": [{"name": "x", "valid_users": ["dave"], "write_list": ["carol"]}]},
     "services.samba.shares.0.write_list.0", "carol may write but is not in valid_users"),
    ({"shares": [{"name": "a", "valid_users": ["dave"]},
                 {"name": "b", "path": "/srv/nas/a", "valid_users": ["dave"]}]},
     "services.samba.shares.1.path", "is the same as share a's"),
    ({"shares": [{"name": "a", "path": "/srv/data", "valid_users": ["dave"]},
                 {"name": "b", "path": "/srv/data/b", "valid_users": ["dave"]}]},
     "services.samba.shares.1.path", "inside or around share a's"),
    ({"shares": [{"name": "a", "valid_users": ["dave"]}, {"name": "a", "path": "/srv/a2",
                                                          "valid_users": ["dave"]}]},
     "services.samba.shares.1.name", "two shares are named a"),
    ({"shares": [{"name": "nobody-can"}]},
     "services.samba.shares.0.valid_users", "nobody could open it"),
    ({"users": [{"name": "carol", "password": {"env": "A"}},
                {"name": "carol", "password": {"env": "B"}}],
      "shares": [{"name": "x", "valid_users": ["carol"]}]},
     "services.samba.users.1.name", "user carol is listed twice"),
])
def test_model_errors_point_at_their_model_path(samba: dict[str, Any], loc: str,
                                                 message: str) -> None:
    with pytest.raises(ModelError) as err:
        validated(model(**samba))
    assert f"{loc}: " in str(err.value) and message in str(err.value), str(err.value)


@pytest.mark.parametrize("samba,message", [
    ({"zone": "internet"}, "Input should be 'lan' or 'vpn'"),
    ({"shares": [{"name": "homes", "valid_users": ["carol"]}]}, "not one of global, homes"),
    ({"shares": [{"name": "x", "path": "relative/dir", "valid_users": ["carol"]}]},
     "an absolute path"),
    ({"shares": [{"name": "x", "path": "/srv/x y", "valid_users": ["carol"]}]},
     "an absolute path"),
    ({"shares": [{"name": "x", "comment": "a] [global", "valid_users": ["carol"]}]},
     "one line without brackets"),
    ({"users": [{"name": "Carol!", "password": {"env": "A"}}]}, "a login name"),
    ({"users": [{"name": "root", "password": {"env": "A"}}]}, "'root' is a system account"),
    ({"users": [{"name": "radicale", "password": {"env": "A"}}]}, "'radicale' is a system"),
    ({"users": [{"name": "carol", "password": "in clear"}]}, "a secret is never written in the model"),
    ({"shares": []}, "at least 1 item"),
])
def test_bad_values_are_refused(samba: dict[str, Any], message: str) -> None:
    with pytest.raises((ValidationError, ModelError), match=message):
        validated(model(**samba))


# ------------------------------------------------------------------------------ on Debian


@pytest.mark.parametrize("release", RELEASES)
def test_testparm_accepts_the_config_and_refuses_broken_ones(release: str,
                                                              validators: Validators) -> None:
    conf = file_of(plan_of(release=release), CONFIG)
    assert conf.validate is not None
    ok = validators.check(release, CONFIG, conf.content, conf.validate)
    assert ok.returncode == 0, (ok.stdout + ok.stderr).decode()
    for broken in (conf.content.replace("SMB3", "SMB9"),            # invalid value
                   conf.content + "   no such option = yes\n",     # ignored by testparm: rc 0
                   conf.content + "   lanman auth = no\n",         # deprecated
                   conf.content + "[unterminated\n"):
        res = validators.check(release, CONFIG, broken, conf.validate)
        assert res.returncode != 0, broken[-60:]


@pytest.mark.parametrize("release", RELEASES)
def test_the_password_import_sets_changes_and_removes_users(release: str,
                                                            validators: Validators) -> None:
    """The plan's import command, run for real with Debian's pdbedit: users get their NT
    hashes, a changed password replaces the hash, a user the model drops is removed."""
    plan = plan_of(release=release)
    users = file_of(plan, USERS_FILE)
    cmd = next(s.command.command for s in plan.steps if type(s).__name__ == "Run"
               and s.command.name.startswith("samba: password database"))
    q = shlex.quote

    def fill(hashes: list[str]) -> str:
        text = users.content
        for i, h in enumerate(hashes):
            text = text.replace(SECRET_MARK.format(i), h)
        return str(text)

    setup = ("mkdir -p /var/lib/samba/private && for u in carol dave erin; do id -u $u "
             ">/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "
             "$u; done; for u in $(pdbedit -L 2>/dev/null | cut -d: -f1); do pdbedit -x -u $u; "
             "done >/dev/null")
    assert validators.run(release, setup).returncode == 0
    try:
        first = fill([nt_hash("c1"), nt_hash("d1"), nt_hash("e1")])
        res = validators.run(release, f"cat > {USERS_FILE} && ( {cmd}\n) && pdbedit -L -w",
                             first)
        assert res.returncode == 0, res.stderr.decode()
        listed = {line.split(":")[0]: line.split(":")[3] for line in res.stdout.decode().splitlines()}
        assert listed == {"carol": nt_hash("c1"), "dave": nt_hash("d1"), "erin": nt_hash("e1")}
        # No copy with the hashes is left behind.
        left = validators.run(release, "ls /var/lib/samba/private")
        assert left.stdout.decode().split() == sorted(
            ["passdb.tdb", "secrets.tdb", "selfhost-users.smbpasswd"]) or \
            "tmp." not in left.stdout.decode()
        # Dave's password changes and Erin leaves the model.
        second = "".join(line + "\n" for line in
                         fill([nt_hash("c1"), nt_hash("d2"), nt_hash("e1")]).splitlines()
                         if not line.startswith("erin:"))
        res = validators.run(release, f"cat > {USERS_FILE} && ( {cmd}\n) && pdbedit -L -w",
                             second)
        assert res.returncode == 0, res.stderr.decode()
        listed = {line.split(":")[0]: line.split(":")[3] for line in res.stdout.decode().splitlines()}
        assert listed == {"carol": nt_hash("c1"), "dave": nt_hash("d2")}
    finally:
        validators.run(release, f"rm -f {q(USERS_FILE)}; for u in $(pdbedit -L | cut -d: -f1);"
                       " do pdbedit -x -u $u; done >/dev/null 2>&1")


SMBD_JOURNAL = (ROOT / "tests" / "fixtures" / "samba" / "smbd-journal.log").read_text()
"""smbd's journal lines as fail2ban's systemd backend formats them (Samba 4.17, Debian 12,
with documentation addresses): a failure's two lines, an unknown user over IPv6, a success,
and a user name that carries a fake "remote host"."""


@pytest.mark.parametrize("release", RELEASES)
def test_the_jail_filter_matches_failed_logins_only(release: str,
                                                    validators: Validators) -> None:
    """fail2ban-regex of the release, with the filter, on smbd's journal lines (as the systemd
    backend formats them): the two failures count, with the client's address; a success does
    not; a user name that brings its own "remote host" is not believed."""
    flt = "/etc/fail2ban/filter.d/selfhost-samba.conf"
    validators.install(release, flt, JAIL_FILTER)
    validators.install(release, "/tmp/smbd.log", SMBD_JOURNAL)
    res = validators.run(release, "fail2ban-regex --print-all-matched /tmp/smbd.log "
                         "selfhost-samba")
    text = res.stdout.decode()
    assert res.returncode == 0, text + res.stderr.decode()
    assert "5 lines, 0 ignored, 2 matched, 3 missed" in text, text
    matched = text.split("Lines:")[1] if "Lines:" in text else text
    assert "192.0.2.7" in matched and "2001:db8::7" in matched
    assert "198.51.100.9" not in text.split("Failregex:")[1].split("Lines:")[0]
