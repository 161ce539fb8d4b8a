"""Checks of the REAL deployed system: effective configuration, running services, open ports.

Run by Molecule's testinfra verifier against every container (podman backend); each test runs
once per container (Debian 12 and 13). Expected values come from examples/home.yaml where the
model says them, and from the hardening baseline otherwise.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Callable
from typing import Any

import pytest

KEX = {
    "bookworm": [
        "sntrup761x25519-sha512@openssh.com", "curve25519-sha256",
        "curve25519-sha256@libssh.org", "diffie-hellman-group16-sha512",
        "diffie-hellman-group18-sha512", "diffie-hellman-group-exchange-sha256",
    ],
    "trixie": [
        "mlkem768x25519-sha256", "sntrup761x25519-sha512",
        "sntrup761x25519-sha512@openssh.com",
        "curve25519-sha256", "curve25519-sha256@libssh.org",  # for paramiko
    ],
}
HOST_KEYS = {"/etc/ssh/ssh_host_ed25519_key", "/etc/ssh/ssh_host_rsa_key"}
CADDY_ROOT_CA = "/var/lib/caddy/.local/share/caddy/pki/authorities/local/root.crt"
SITE_TEXT = "Hello from selfhost"


def retry(call: Callable[[], Any], ok: Callable[[Any], bool], timeout: float = 30) -> Any:
    """Call `call` until `ok(result)` or `timeout` seconds have passed; return the last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = call()
        if ok(result) or time.monotonic() > deadline:
            return result
        time.sleep(1)


def site_fqdn(model: dict[str, Any]) -> str:
    host = model["services"]["web"]["sites"][0]["host"]
    return str(model["domain"]) if host == "@" else f"{host}.{model['domain']}"


# --- host name, time zone, kernel settings ----------------------------------------------------

def test_hostname(host: Any, model: dict[str, Any]) -> None:
    # The containers start with another name (molecule/default/create.yml): the deploy sets
    # /etc/hostname; the running name of a container is podman's and cannot change.
    assert host.file("/etc/hostname").content_string.strip() == model["hostname"]
    if host.run("systemd-detect-virt --container --quiet").rc != 0:
        assert host.check_output("hostname") == model["hostname"]


def test_timezone(host: Any, model: dict[str, Any]) -> None:
    tz = model["timezone"]
    assert host.file("/etc/timezone").content_string.strip() == tz
    assert host.file("/etc/localtime").linked_to == f"/usr/share/zoneinfo/{tz}"


def test_sysctl_hardening_file(host: Any) -> None:
    conf = host.file("/etc/sysctl.d/99-zz-selfhost-hardening.conf")
    assert conf.is_file
    assert conf.user == "root"
    assert re.search(r"^kernel\.kptr_restrict\s*=\s*2$", conf.content_string, re.M)
    assert not host.file("/etc/sysctl.d/60-selfhost-hardening.conf").exists  # the old name


def test_the_model_wins_every_sysctl_key_at_boot(host: Any) -> None:
    # systemd-sysctl applies the sysctl.d files in the order of their names, the last
    # assignment wins: on Debian 12, systemd's 99-protect-links.conf set fs.protected_fifos
    # back to 1 after the model's file while it was named 60-...
    ours = dict(re.findall(r"^([\w.-]+)\s*=\s*(\S+)\s*$", host.file(
        "/etc/sysctl.d/99-zz-selfhost-hardening.conf").content_string, re.M))
    last: dict[str, tuple[str, str]] = {}
    source = ""
    for line in host.check_output("/usr/lib/systemd/systemd-sysctl --cat-config").splitlines():
        if line.startswith("# /"):
            source = line[2:]
        elif (m := re.match(r"^-?([\w./-]+)\s*=\s*(.*?)\s*$", line)):
            last[m.group(1).replace("/", ".")] = (m.group(2), source)
    wrong = {k: last[k] for k, v in ours.items() if last.get(k, (v, ""))[0] != v}
    assert ours and wrong == {}, wrong


# --- admins --------------------------------------------------------------------------------

def _key_id(line: str) -> tuple[str, str] | None:
    """(type, base64 blob) of an authorized_keys/public key line, options and comment aside."""
    m = re.search(r"(?:^|\s)((?:ssh|ecdsa|sk)-[\w@.-]+)\s+([A-Za-z0-9+/]+=*)", line)
    return (m.group(1), m.group(2)) if m else None


def test_admins(host: Any, model: dict[str, Any]) -> None:
    for admin in model["admins"]:
        user = host.user(admin["name"])
        assert user.exists, admin["name"]
        assert "sudo" in user.groups
        ssh_dir = host.file(f"{user.home}/.ssh")
        assert ssh_dir.is_directory
        assert ssh_dir.user == admin["name"]
        assert ssh_dir.mode & 0o077 == 0
        keys = host.file(f"{user.home}/.ssh/authorized_keys")
        assert keys.is_file
        assert keys.user == admin["name"]
        assert keys.mode & 0o022 == 0
        lines = [ln for ln in keys.content_string.splitlines()
                 if ln.strip() and not ln.lstrip().startswith("#")]
        assert [_key_id(ln) for ln in lines] == [_key_id(k) for k in admin["ssh_keys"]]


def test_sudoers(host: Any) -> None:
    f = host.file("/etc/sudoers.d/selfhost-admins")
    assert f.is_file
    assert f.user == "root"
    assert f.mode == 0o440
    assert host.run("visudo -c -f /etc/sudoers.d/selfhost-admins").rc == 0
    assert host.run("visudo -c").rc == 0  # the whole sudo configuration still parses


# --- SSH -----------------------------------------------------------------------------------

SSHD_EXPECTED = {
    "permitrootlogin": "no",
    "passwordauthentication": "no",
    "kbdinteractiveauthentication": "no",
    "pubkeyauthentication": "yes",
    "maxauthtries": "3",
    "x11forwarding": "no",
    "allowtcpforwarding": "no",
    "loglevel": "VERBOSE",
}


@pytest.mark.parametrize(("keyword", "value"), sorted(SSHD_EXPECTED.items()))
def test_sshd_effective_setting(sshd_t: dict[str, list[str]], keyword: str, value: str) -> None:
    assert sshd_t.get(keyword) == [value]


def test_sshd_allowusers(sshd_t: dict[str, list[str]], model: dict[str, Any]) -> None:
    allowed = " ".join(sshd_t.get("allowusers", [])).split()
    assert sorted(allowed) == sorted(a["name"] for a in model["admins"])


# Same algorithm as sntrup761x25519-sha512@openssh.com under its standard name; Debian 12's
# OpenSSH knows it since 1:9.2p1-2+deb12u4, and listing both is allowed there.
KEX_ALIASES = {"bookworm": {"sntrup761x25519-sha512"}, "trixie": set()}


def test_sshd_kex(sshd_t: dict[str, list[str]], release: str) -> None:
    [value] = sshd_t["kexalgorithms"]
    offered = [k for k in value.split(",") if k not in KEX_ALIASES[release]]
    assert offered == KEX[release], value


def test_sshd_host_keys(host: Any, sshd_t: dict[str, list[str]]) -> None:
    assert set(sshd_t["hostkey"]) == HOST_KEYS
    on_disk = set(host.check_output("ls /etc/ssh/ssh_host_*_key").split())
    assert on_disk == HOST_KEYS
    # What clients really get from the running sshd.
    scan = host.check_output("ssh-keyscan -T 5 -t rsa,ecdsa,ed25519 -p 22 127.0.0.1 2>/dev/null")
    offered = {line.split()[1] for line in scan.splitlines() if not line.startswith("#")}
    assert offered == {"ssh-ed25519", "ssh-rsa"}


def test_rsa_host_key_is_4096_bits(host: Any) -> None:
    bits = host.check_output("ssh-keygen -l -f /etc/ssh/ssh_host_rsa_key.pub").split()[0]
    assert int(bits) == 4096


def test_moduli_at_least_3072_bits(host: Any) -> None:
    sizes = [int(line.split()[4])
             for line in host.file("/etc/ssh/moduli").content_string.splitlines()
             if line.strip() and not line.startswith("#")]
    assert sizes, "no moduli left: diffie-hellman-group-exchange would fail"
    assert min(sizes) >= 3071


def test_running_sshd_refuses_passwords_and_weak_kex(host: Any) -> None:
    ssh = ("ssh -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
           "-o ConnectTimeout=5 -p 22")
    # Only public keys are offered, even for a user that does not exist.
    login = host.run(f"{ssh} nobody@127.0.0.1 true")
    assert login.rc == 255
    assert "Permission denied (publickey)" in login.stderr
    weak = host.run(f"{ssh} -o KexAlgorithms=diffie-hellman-group14-sha256 nobody@127.0.0.1 true")
    assert weak.rc == 255
    assert "no matching key exchange method" in weak.stderr


# --- firewall ------------------------------------------------------------------------------

PORT_NAMES = {"ssh": 22, "http": 80, "https": 443, "dhcpv6-client": 546}
OTHER_ACCEPTS = [
    r"ct state established,related accept",
    r'iif "lo" accept',
    r"ip protocol (icmp|1) icmp type \{[^}]*\}( limit rate [\w/ ]+)? accept",
    r"(meta l4proto (ipv6-icmp|58) )?icmpv6 type \{[^}]*\}( limit rate [\w/ ]+)? accept",
]


def _ports(spec: str) -> set[int]:
    names = spec.strip("{} ").split(",")
    return {int(n) if n.strip().isdigit() else PORT_NAMES[n.strip()] for n in names}


def test_firewall(host: Any) -> None:
    ruleset = host.check_output("nft list ruleset")
    assert "table inet selfhost {" in ruleset
    chain = host.check_output("nft list chain inet selfhost input")
    assert re.search(r"type filter hook input priority (filter|0); policy drop;", chain), chain
    open_ports: set[tuple[str, int]] = set()
    for raw in chain.splitlines():
        line = re.sub(r'\s*comment ".*"$', "", raw.strip())
        if not line.endswith("accept"):
            continue
        m = re.search(r"\b(tcp|udp) dport (\{[^}]*\}|\S+)", line)
        if m is None:
            assert any(re.fullmatch(p, line) for p in OTHER_ACCEPTS), f"unexpected rule: {line}"
            continue
        ports = {(m.group(1), p) for p in _ports(m.group(2))}
        if "saddr" in line:
            # Limited to some sources: only the DHCPv6 client from link-local routers is expected.
            assert ports == {("udp", 546)} and "fe80::/10" in line, f"unexpected rule: {line}"
            continue
        open_ports |= ports
    assert open_ports == {("tcp", 22), ("tcp", 80), ("tcp", 443), ("udp", 443)}


def test_nftables_enabled(host: Any) -> None:
    assert host.service("nftables").is_enabled


# --- listeners -----------------------------------------------------------------------------

def _is_loopback(addr: str) -> bool:
    addr = addr.strip("[]").split("%")[0]
    if addr == "*":
        return False
    return ipaddress.ip_address(addr).is_loopback


def test_listeners(host: Any) -> None:
    # ss names the process only when it may read its /proc/PID/fd: not for caddy's own user
    # in a container without CAP_SYS_PTRACE. The socket's owner (uid) always shows.
    caddy_uid = host.check_output("id -u caddy")
    by_port: dict[int, set[str]] = {}
    exposed: set[int] = set()
    for line in host.check_output("ss -Hltnpe 2>/dev/null").splitlines():
        cols = line.split()
        addr, _, port = cols[3].rpartition(":")
        owners = set(re.findall(r'\("([^"]+)"', line))
        if re.search(rf"\buid:{caddy_uid}\b", line):
            owners.add("caddy")
        by_port.setdefault(int(port), set()).update(owners)
        if not _is_loopback(addr):
            exposed.add(int(port))
    assert "sshd" in by_port.get(22, set())
    assert "caddy" in by_port.get(80, set())
    assert "caddy" in by_port.get(443, set())
    assert exposed == {22, 80, 443}


# --- web site ------------------------------------------------------------------------------

def test_site_over_https(host: Any, model: dict[str, Any]) -> None:
    fqdn = site_fqdn(model)
    cmd = (f"curl -fsS --max-time 10 --cacert {CADDY_ROOT_CA} "
           f"--resolve {fqdn}:443:127.0.0.1 https://{fqdn}/")
    # Caddy issues the certificate from its own CA shortly after it starts.
    result = retry(lambda: host.run(cmd), lambda r: r.rc == 0, timeout=30)
    assert result.rc == 0, result.stderr
    assert SITE_TEXT in result.stdout


def test_http_redirects_to_https(host: Any, model: dict[str, Any]) -> None:
    fqdn = site_fqdn(model)
    out = host.check_output(
        f"curl -sS --max-time 10 -o /dev/null -w '%{{http_code}} %{{redirect_url}}' "
        f"--resolve {fqdn}:80:127.0.0.1 http://{fqdn}/"
    )
    code, _, location = out.partition(" ")
    assert code in ("301", "302", "307", "308"), out
    assert location.startswith(f"https://{fqdn}/"), out


# --- updates, fail2ban, services ------------------------------------------------------------

def test_unattended_upgrades(host: Any) -> None:
    assert host.package("unattended-upgrades").is_installed
    assert 'APT::Periodic::Unattended-Upgrade "1";' in host.check_output("apt-config dump")
    timer = host.service("apt-daily-upgrade.timer")
    assert timer.is_enabled
    assert timer.is_running


def test_fail2ban_jails(host: Any) -> None:
    assert host.service("fail2ban").is_running

    def jails() -> set[str]:
        r = host.run("fail2ban-client status")
        m = re.search(r"Jail list:\s*(.*)", r.stdout)
        return {j.strip() for j in m.group(1).split(",")} if r.rc == 0 and m else set()

    found = retry(jails, lambda found: {"sshd", "recidive"} <= found, timeout=20)
    assert {"sshd", "recidive"} <= found


@pytest.mark.parametrize("unit", ["ssh", "caddy", "nftables", "fail2ban"])
def test_service_enabled_and_running(host: Any, unit: str) -> None:
    service = host.service(unit)
    assert service.is_enabled
    assert service.is_running  # for nftables (a oneshot): active since it loaded the ruleset
