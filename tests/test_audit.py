from selfhost.audit import Socket, is_loopback, parse_ss, unaccounted
from selfhost.compile.plan import Plan
from selfhost.compose.requests import Port

SS = """\
udp   UNCONN 0      0          127.0.0.53%lo:53        0.0.0.0:*    users:(("systemd-resolve",pid=1,fd=1))
udp   UNCONN 0      0                      *:443             *:*    users:(("caddy",pid=2,fd=9))
tcp   LISTEN 0      128              0.0.0.0:22        0.0.0.0:*    users:(("sshd",pid=3,fd=3))
tcp   LISTEN 0      4096           127.0.0.1:2019      0.0.0.0:*    users:(("caddy",pid=2,fd=3))
tcp   LISTEN 0      4096                   *:80              *:*    users:(("caddy",pid=2,fd=7))
tcp   LISTEN 0      4096                   *:443             *:*    users:(("caddy",pid=2,fd=8))
tcp   LISTEN 0      128                 [::]:22           [::]:*    users:(("sshd",pid=3,fd=4))
tcp   LISTEN 0      64                  [::]:111          [::]:*    users:(("rpcbind",pid=9,fd=4))
tcp   LISTEN 0      5                  [::1]:631          [::]:*    users:(("cupsd",pid=8,fd=4))
"""


def test_parse_ss() -> None:
    socks = parse_ss(SS)
    assert len(socks) == 9
    assert Socket("tcp", "0.0.0.0", 22, "sshd") in socks
    assert Socket("tcp", "::", 111, "rpcbind") in socks
    assert Socket("udp", "127.0.0.53%lo", 53, "systemd-resolve") in socks


def test_loopback() -> None:
    assert is_loopback("127.0.0.53%lo")
    assert is_loopback("::1")
    assert not is_loopback("0.0.0.0")
    assert not is_loopback("*")


def test_unaccounted_lists_only_unexplained_public_sockets() -> None:
    plan = Plan(hostname="nas.home.arpa", release="bookworm",
                ports=[Port(22, "tcp", origin="hardening.ssh"), Port(80, "tcp", origin="services.web"),
                       Port(443, "tcp", origin="services.web"),
                       Port(443, "udp", origin="services.web")])
    assert unaccounted(plan, parse_ss(SS)) == [Socket("tcp", "::", 111, "rpcbind")]
    plan.ports = plan.ports[:1]
    assert [s.port for s in unaccounted(plan, parse_ss(SS))] == [80, 111, 443, 443]
