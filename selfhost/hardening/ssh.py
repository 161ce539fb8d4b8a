"""OpenSSH server hardening: key-only logins for the admins, modern crypto, no lockout.

The crypto lists are those of ssh-audit's built-in policies "Hardened Debian 12 (version 3)"
and "Hardened Debian 13 (version 1)", chosen by the OpenSSH release installed on the target.
Every change is checked with ``sshd -t`` on a staged copy before it replaces the live file,
and sshd is reloaded (never restarted), so open sessions survive.
"""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network
from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from selfhost.compose.module import Contribution, Env
from selfhost.compose.requests import Jail, Request
from selfhost.compose.requests import Port as PortRequest
from selfhost.compose.resources import Command, ManagedFile, Unit
from selfhost.hardening.base import Control
from selfhost.models.base import Port

if TYPE_CHECKING:
    from selfhost.compile.target import Target
    from selfhost.models.server import Server

SSHD_CONFIG = "/etc/ssh/sshd_config"
MODULI = "/etc/ssh/moduli"

CRYPTO: dict[str, dict[str, list[str]]] = {
    # OpenSSH 9.2 (Debian 12)
    "bookworm": {
        "KexAlgorithms": [
            # The name without @openssh.com needs openssh-server 1:9.2p1-2+deb12u4 (Dec 2024).
            "sntrup761x25519-sha512", "sntrup761x25519-sha512@openssh.com", "curve25519-sha256",
            "curve25519-sha256@libssh.org", "diffie-hellman-group16-sha512",
            "diffie-hellman-group18-sha512", "diffie-hellman-group-exchange-sha256",
        ],
        "Ciphers": [
            "chacha20-poly1305@openssh.com", "aes256-gcm@openssh.com", "aes256-ctr",
            "aes192-ctr", "aes128-gcm@openssh.com", "aes128-ctr",
        ],
        "MACs": [
            "hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com",
            "umac-128-etm@openssh.com",
        ],
        "HostKeyAlgorithms": ["ssh-ed25519", "rsa-sha2-512", "rsa-sha2-256"],
    },
    # OpenSSH 10.0 (Debian 13): post-quantum key exchange first (what OpenSSH clients agree
    # on), then curve25519: ssh-audit's "Hardened Debian 13" policy lists the post-quantum
    # ones only, but pyinfra's SSH library (paramiko 4.0) knows none of them, and without
    # curve25519 the admin could never deploy to the server over SSH again.
    "trixie": {
        "KexAlgorithms": [
            "mlkem768x25519-sha256", "sntrup761x25519-sha512",
            "sntrup761x25519-sha512@openssh.com", "curve25519-sha256",
            "curve25519-sha256@libssh.org",
        ],
        "Ciphers": [
            "chacha20-poly1305@openssh.com", "aes256-gcm@openssh.com", "aes256-ctr",
            "aes192-ctr", "aes128-gcm@openssh.com", "aes128-ctr",
        ],
        "MACs": [
            "hmac-sha2-512-etm@openssh.com", "hmac-sha2-256-etm@openssh.com",
            "umac-128-etm@openssh.com",
        ],
        "HostKeyAlgorithms": ["ssh-ed25519", "rsa-sha2-512", "rsa-sha2-256"],
    },
}


class SshHardening(Control):
    """sshd: key-only, no root, only the admins, modern crypto, short grace time."""

    port: Port = Field(default=22, description="TCP port sshd listens on.")
    allow_from: list[IPv4Network | IPv6Network] = Field(
        default_factory=list,
        description="If set, admins may log in only from these networks (e.g. LAN or VPN). "
        "Applied both in sshd (AllowUsers user@net) and in the firewall.",
    )
    max_auth_tries: int = Field(default=3, ge=1, le=10, description="MaxAuthTries.")
    login_grace_time: int = Field(default=30, ge=5, le=600, description="LoginGraceTime (s).")
    max_sessions: int = Field(default=2, ge=1, le=64, description="MaxSessions per connection.")
    allow_tcp_forwarding: bool = Field(default=False, description="AllowTcpForwarding.")
    allow_agent_forwarding: bool = Field(default=False, description="AllowAgentForwarding.")
    x11_forwarding: bool = Field(default=False, description="X11Forwarding.")
    permit_tunnel: bool = Field(default=False, description="PermitTunnel.")
    password_authentication: bool = Field(
        default=False,
        description="Allow password logins (discouraged; every admin then needs a password).",
    )
    rate_limit_per_minute: int = Field(
        default=10, ge=1, le=1000,
        description="New SSH connections per minute and source address before the firewall "
        "drops them.",
    )

    def crypto(self, release: str) -> dict[str, list[str]]:
        return CRYPTO.get(release, CRYPTO["bookworm"])

    def sshd_config(self, server: Server, target: Target) -> str:
        admins = sorted(a.name for a in server.admins)
        nets = self.allow_from
        allow_users = [f"{a}@{n}" for a in admins for n in nets] if nets else admins
        yn = {True: "yes", False: "no"}
        settings: list[tuple[str, str]] = [
            ("Port", str(self.port)),
            ("AddressFamily", "any"),
            ("HostKey", "/etc/ssh/ssh_host_ed25519_key"),
            ("HostKey", "/etc/ssh/ssh_host_rsa_key"),
        ]
        for key, values in self.crypto(target.release).items():
            settings.append((key, ",".join(values)))
        settings += [
            ("RequiredRSASize", "3072"),
            ("SyslogFacility", "AUTH"),
            ("LogLevel", "VERBOSE"),
            ("LoginGraceTime", str(self.login_grace_time)),
            ("PermitRootLogin", "no"),
            ("StrictModes", "yes"),
            ("MaxAuthTries", str(self.max_auth_tries)),
            ("MaxSessions", str(self.max_sessions)),
            ("MaxStartups", "10:30:60"),
            ("PubkeyAuthentication", "yes"),
            ("AuthenticationMethods", "publickey" if not self.password_authentication
             else "publickey password"),
            ("PasswordAuthentication", yn[self.password_authentication]),
            ("KbdInteractiveAuthentication", "no"),
            ("PermitEmptyPasswords", "no"),
            ("HostbasedAuthentication", "no"),
            ("IgnoreRhosts", "yes"),
            ("UsePAM", "yes"),
            ("AllowUsers", " ".join(allow_users)),
            ("AllowAgentForwarding", yn[self.allow_agent_forwarding]),
            ("AllowTcpForwarding", yn[self.allow_tcp_forwarding]),
            ("AllowStreamLocalForwarding", "no"),
            ("GatewayPorts", "no"),
            ("X11Forwarding", yn[self.x11_forwarding]),
            ("PermitTunnel", yn[self.permit_tunnel]),
            ("PermitUserEnvironment", "no"),
            ("Compression", "no"),
            ("TCPKeepAlive", "no"),
            ("ClientAliveInterval", "300"),
            ("ClientAliveCountMax", "2"),
            ("UseDNS", "no"),
            ("PrintMotd", "no"),
            ("PrintLastLog", "yes"),
            ("DebianBanner", "no"),
            ("AcceptEnv", "LANG LC_*"),
            ("Subsystem", "sftp internal-sftp -f AUTHPRIV -l INFO"),
        ]
        lines = [
            "# Managed by selfhost: changes here are overwritten on the next deploy.",
            "# Crypto: ssh-audit policy for Debian "
            + ("13" if target.release == "trixie" else "12") + ".",
            "# Drop-ins in sshd_config.d are read after these settings: they cannot change a",
            "# keyword set here (the first value wins), but they can add Match blocks.",
        ]
        lines += [f"{k} {v}" for k, v in settings]
        lines.append("Include /etc/ssh/sshd_config.d/*.conf")
        return "\n".join(lines) + "\n"

    uses: ClassVar[tuple[type[Request], ...]] = (PortRequest, Jail)

    def requests(self, env: Env) -> list[Request]:
        if not self.enabled:
            return [PortRequest(self.port, "tcp")]
        return [PortRequest(self.port, "tcp", comment="rate-limited"),
                Jail("sshd", port=str(self.port), maxretry=self.max_auth_tries)]

    def contribute(self, env: Env) -> Contribution:
        server, target = env.server, env.require_target()
        c = Contribution(packages=["openssh-server"])
        if not self.enabled:
            return c
        c.commands += [HOST_KEYS_CMD, MODULI_CMD]
        c.files.append(
            ManagedFile(SSHD_CONFIG, self.sshd_config(server, target), mode="0600",
                        validate="/usr/sbin/sshd -t -f {path}")
        )
        c.units.append(Unit("ssh.service", reload_on=(SSHD_CONFIG,)))
        return c


RSA_KEY = "/etc/ssh/ssh_host_rsa_key"
RSA_EARLY = RSA_KEY + ".selfhost-early"
"""Where the RSA 4096 host key is made in the background while packages install (about 10 s
of CPU on a small machine): the host keys command then takes it, once checked."""
_RSA_4096 = "awk '{n = $1} END {exit !(n >= 4096)}'"
"""Succeeds for a key of 4096 bits or more (not for no key: ``{exit !($1>=4096)}`` did)."""
HOST_KEYS_CMD = Command(
    "ssh host keys: Ed25519 and RSA 4096 only",
    "test -f /etc/ssh/ssh_host_ed25519_key || "
    "ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key; "
    f"ssh-keygen -l -f {RSA_KEY}.pub 2>/dev/null | {_RSA_4096} || "
    # The key made while the packages installed, if complete (the pair matches) and 4096 bits.
    f"if ssh-keygen -l -f {RSA_EARLY}.pub 2>/dev/null | {_RSA_4096} && "
    f"k=$(ssh-keygen -y -f {RSA_EARLY} 2>/dev/null | cut -d' ' -f1,2) && [ -n \"$k\" ] && "
    f"[ \"$k\" = \"$(cut -d' ' -f1,2 {RSA_EARLY}.pub)\" ]; then "
    f"mv -f {RSA_EARLY} {RSA_KEY} && mv -f {RSA_EARLY}.pub {RSA_KEY}.pub; "
    f"else rm -f {RSA_KEY} {RSA_KEY}.pub; "
    f"ssh-keygen -q -t rsa -b 4096 -N '' -f {RSA_KEY}; fi; "
    f"rm -f {RSA_EARLY} {RSA_EARLY}.pub /etc/ssh/ssh_host_ecdsa_key* /etc/ssh/ssh_host_dsa_key*",
    unless="test -f /etc/ssh/ssh_host_ed25519_key && "
    f"ssh-keygen -l -f {RSA_KEY}.pub 2>/dev/null | {_RSA_4096} && "
    "! ls /etc/ssh/ssh_host_ecdsa_key* /etc/ssh/ssh_host_dsa_key* >/dev/null 2>&1",
    during_packages=f"command -v ssh-keygen >/dev/null && test -d /etc/ssh && "
    f"rm -f {RSA_EARLY} {RSA_EARLY}.pub && "
    f"ssh-keygen -q -t rsa -b 4096 -N '' -f {RSA_EARLY}",
)
MODULI_CMD = Command(
    "ssh: remove Diffie-Hellman moduli under 3072 bits",
    "awk '$1 !~ /^[0-9]+$/ || $5 >= 3071' /etc/ssh/moduli > /etc/ssh/moduli.selfhost-new && "
    "mv /etc/ssh/moduli.selfhost-new /etc/ssh/moduli",
    unless="awk '$1 ~ /^[0-9]+$/ && $5 < 3071 {bad=1} END {exit bad}' /etc/ssh/moduli",
)
