"""The NAS (examples/nas.yaml), checked with a real SMB client.

The client is a second container on an internal network that this scenario created (the
server at .2, the client at .3), with Debian's ``smbclient``: it lists, reads and writes the
shares over SMB3 as a laptop on the LAN would, and is refused what the model refuses (a user
not on a share's list, a wrong password, a read-only user writing, SMB2 and SMB1 dialects).
Last, repeated wrong passwords get the client banned by fail2ban in nftables.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

import pytest

CAROL = os.environ.get("NAS_CAROL_PASSWORD", "molecule: Carol's share password, 2026!")
DAVE = os.environ.get("NAS_DAVE_PASSWORD", "molecule: Dave's share password, 2026!")
ERIN = os.environ.get("NAS_ERIN_PASSWORD", "molecule: Erin reads only, 2026!")
SUBNETS = {"s12-bookworm": "10.213.121", "s12-trixie": "10.213.122"}


def _name(host: Any) -> str:
    return str(host.backend.name)


def smb(host: Any, share: str, user: str, password: str, commands: str,
        *options: str) -> subprocess.CompletedProcess[str]:
    """Run smbclient in the server's client container against the server's test address."""
    name = _name(host)
    server = f"{SUBNETS[name]}.2"
    # The password on standard input (smbclient reads it there when -U has none).
    return subprocess.run(
        ["podman", "exec", "-i", f"{name}-client", "smbclient", f"//{server}/{share}",
         "-U", user, "-t", "10", *options, "-c", commands],
        input=password + "\n", capture_output=True, text=True, timeout=60)


def out(res: subprocess.CompletedProcess[str]) -> str:
    return res.stdout + res.stderr


def test_smbd_serves_port_445_only_and_nmbd_is_off(host: Any) -> None:
    assert host.service("smbd").is_running and host.service("smbd").is_enabled
    assert not host.service("nmbd").is_running and not host.service("nmbd").is_enabled
    listening = host.check_output("ss -Hltnp | grep smbd || true")
    ports = {line.split()[3].rsplit(":", 1)[1] for line in listening.splitlines()}
    assert ports == {"445"}, listening


def test_passwords_reach_the_server_as_nt_hashes_only(host: Any) -> None:
    f = host.file("/var/lib/samba/private/selfhost-users.smbpasswd")
    assert f.mode == 0o600 and f.user == "root"
    users = host.check_output("pdbedit -L | cut -d: -f1 | sort").split()
    assert users == ["carol", "dave", "erin"]
    for secret in (CAROL, DAVE, ERIN):
        found = host.run("grep -rlF -- %s /etc /var/lib/samba /var/log", secret)
        assert found.rc == 1, found.stdout  # nowhere in clear
    for user in ("carol", "dave", "erin"):
        assert host.user(user).shell == "/usr/sbin/nologin"


def test_a_writer_lists_and_writes_and_the_file_is_theirs(host: Any) -> None:
    res = smb(host, "family", "carol", CAROL,
              "put /etc/hostname from-carol.txt; mkdir carol-dir; ls")
    assert res.returncode == 0, out(res)
    assert "from-carol.txt" in res.stdout and "carol-dir" in res.stdout
    f = host.file("/srv/nas/family/from-carol.txt")
    assert (f.user, f.group, f.mode) == ("carol", "smb-family", 0o660)
    d = host.file("/srv/nas/family/carol-dir")
    assert (d.user, d.group) == ("carol", "smb-family") and d.mode & 0o2000  # setgid kept
    res = smb(host, "family", "dave", DAVE, "put /etc/hostname from-dave.txt")
    assert res.returncode == 0, out(res)
    assert host.file("/srv/nas/family/from-dave.txt").user == "dave"


def test_a_reader_reads_but_cannot_write(host: Any) -> None:
    res = smb(host, "family", "erin", ERIN, "get from-carol.txt /tmp/got.txt; ls")
    assert res.returncode == 0, out(res)
    res = smb(host, "family", "erin", ERIN, "put /etc/hostname from-erin.txt")
    assert res.returncode != 0 and "NT_STATUS_ACCESS_DENIED" in out(res), out(res)
    assert not host.file("/srv/nas/family/from-erin.txt").exists


def test_a_user_not_on_the_list_is_refused(host: Any) -> None:
    res = smb(host, "carol", "erin", ERIN, "ls")
    assert res.returncode != 0 and "NT_STATUS_ACCESS_DENIED" in out(res), out(res)
    res = smb(host, "carol", "carol", CAROL, "ls")
    assert res.returncode == 0, out(res)


def test_wrong_password_and_anonymous_are_refused(host: Any) -> None:
    res = smb(host, "family", "carol", "not Carol's password", "ls")
    assert res.returncode != 0 and "NT_STATUS_LOGON_FAILURE" in out(res), out(res)
    res = smb(host, "family", "", "", "ls", "-N")
    assert res.returncode != 0, out(res)


@pytest.mark.parametrize("options", [
    # SMB1: the client's own floor (SMB2_02) lowered too, so that the server is the one asked.
    ("-m", "NT1", "--option=client min protocol=NT1"),
    ("--option=client max protocol=SMB2_02",),  # SMB 2.0.2
    ("--option=client max protocol=SMB2_10",),  # SMB 2.1
])
def test_old_dialects_are_refused(host: Any, options: tuple[str, ...]) -> None:
    res = smb(host, "family", "carol", CAROL, "ls", *options)
    assert res.returncode != 0, out(res)
    assert "protocol negotiation failed" in out(res) or "NT_STATUS" in out(res), out(res)
    # The same client with SMB3 allowed gets in (the refusal is about the dialect).
    assert smb(host, "family", "carol", CAROL, "ls").returncode == 0


def test_repeated_wrong_passwords_get_the_client_banned(host: Any) -> None:
    client = f"{SUBNETS[_name(host)]}.3"
    for i in range(6):
        smb(host, "family", "dave", f"wrong password {i}", "ls")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = host.check_output("fail2ban-client status samba")
        if client in status:
            break
        time.sleep(1)
    assert client in status, status
    assert client in host.check_output("nft list ruleset")
    res = smb(host, "family", "dave", DAVE, "ls")
    assert res.returncode != 0, out(res)  # even the right password: the address is banned
    host.run("fail2ban-client set samba unbanip %s", client)
    assert smb(host, "family", "dave", DAVE, "ls").returncode == 0
