"""The friend's backup host: sftp repositories kept by another host of the same fleet.

The user writes the relation once, on the client (``type: sftp, peer: <fleet host>``). The
client's backup module sends a :class:`~selfhost.compose.requests.PeerBackupAccount` request
to the peer, whose :class:`BackupPeers` module provides it. Both ends are known at plan time:

- the client's SSH key pair is generated on the deploying machine, under
  ``backup.key_dir`` (``<client>-<repo>`` and ``.pub``, 0600/0700), so the public key can go
  into the peer's plan and the private key to the client (as a secret, never logged);
- the peer gets a dedicated account ``backup-<client>``: no password, no shell use, key-only
  (``restrict`` keys in a root-owned ``/etc/ssh/selfhost-backup-keys/<account>``), and sshd's
  ``Match User`` block forces ``internal-sftp`` chrooted to ``/srv/backup-peers/<client>``
  (the repository is its ``data/`` directory). The drop-in also appends the account to
  ``AllowUsers`` (sshd accumulates AllowUsers lines across files);
- the peer's Ed25519 host key is read from it at deploy time into the client's known_hosts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from selfhost.backup.restic import peer_user
from selfhost.compose.keys import FakeKeyStore
from selfhost.compose.module import Contribution, Env, Module
from selfhost.compose.requests import PeerBackupAccount, Request
from selfhost.compose.resources import Command, ManagedDir, ManagedFile, Unit

if TYPE_CHECKING:
    from selfhost.models.backup import Repository
    from selfhost.models.server import Server

PEER_ROOT = "/srv/backup-peers"
KEYS_DIR = "/etc/ssh/selfhost-backup-keys"
SSHD_DROPIN = "/etc/ssh/sshd_config.d/selfhost-backup-peers.conf"
SSHD_DROPIN_CHECK = (
    "t=$(mktemp) && { grep -v '^Include' /etc/ssh/sshd_config; cat {path}; } > \"$t\" && "
    "/usr/sbin/sshd -t -f \"$t\"; rc=$?; rm -f \"$t\"; exit $rc"
)


@dataclass(frozen=True)
class PeerClient:
    """One client repository kept on this host."""

    client: str
    """The client's host name (the account is ``backup-<client>``)."""
    repo: str
    public_key: str


def key_path(server: Server, repo: Repository) -> Path:
    """Private key of ``repo`` on the deploying machine (the public key is ``.pub`` next to it)."""
    return Path(server.backup.key_dir).expanduser() / f"{server.hostname}-{repo.name}"


def sshd_dropin(clients: list[PeerClient]) -> str:
    accounts = sorted({peer_user(c.client) for c in clients})
    lines = [
        "# Managed by selfhost: accounts that receive other hosts' backups (sftp only).",
        "AllowUsers " + " ".join(accounts),
    ]
    for account in accounts:
        client = account.removeprefix("backup-")
        lines += [
            "",
            f"Match User {account}",
            f"\tChrootDirectory {PEER_ROOT}/{client}",
            "\tForceCommand internal-sftp",
            f"\tAuthorizedKeysFile {KEYS_DIR}/%u",
            "\tAuthenticationMethods publickey",
            "\tPasswordAuthentication no",
            "\tPermitTTY no",
            "\tAllowTcpForwarding no",
            "\tAllowAgentForwarding no",
            "\tAllowStreamLocalForwarding no",
            "\tX11Forwarding no",
            "\tPermitTunnel no",
        ]
    return "\n".join(lines) + "\n"


class BackupPeers(Module):
    """Provider of :class:`PeerBackupAccount` requests: the accounts that keep other hosts'
    repositories on this one."""

    provides: ClassVar[tuple[type[Request], ...]] = (PeerBackupAccount,)

    def contribute(self, env: Env) -> Contribution:
        keys = env.keys or FakeKeyStore()
        clients = [PeerClient(r.client, r.repo, keys.public_key(r.key_name))
                   for r in env.incoming(PeerBackupAccount)]
        return receiver_contribution(clients)


def receiver_contribution(clients: list[PeerClient]) -> Contribution:
    """What a peer needs to keep its clients' repositories (empty without clients)."""
    c = Contribution()
    if not clients:
        return c
    c.packages.append("openssh-server")
    c.directories += [ManagedDir(PEER_ROOT, "0755"), ManagedDir(KEYS_DIR, "0755")]
    by_account: dict[str, list[PeerClient]] = {}
    for pc in clients:
        by_account.setdefault(peer_user(pc.client), []).append(pc)
    for account in sorted(by_account):
        client = account.removeprefix("backup-")
        home = f"{PEER_ROOT}/{client}"
        c.commands.append(Command(
            f"backup peer: account {account}",
            f"mkdir -p {PEER_ROOT} && useradd --system --user-group --home-dir {home} "
            f"--no-create-home --shell /usr/sbin/nologin --password '*' {account}",
            unless=f"id -u {account}",
        ))
        # ChrootDirectory: every component root-owned and not group/other writable.
        c.directories.append(ManagedDir(home, "0755"))
        c.directories.append(ManagedDir(f"{home}/data", "0700", owner=account, group=account))
        keys = "".join(
            f'restrict,command="internal-sftp" {pc.public_key}\n'
            for pc in sorted(by_account[account], key=lambda p: p.repo)
        )
        c.files.append(ManagedFile(f"{KEYS_DIR}/{account}", keys, mode="0644"))
    c.files.append(ManagedFile(SSHD_DROPIN, sshd_dropin(clients), mode="0600",
                               validate=SSHD_DROPIN_CHECK))
    c.units.append(Unit("ssh.service", reload_on=(SSHD_DROPIN,)))
    return c


def known_hosts_line(host: str, port: int, host_key: str) -> str:
    """An OpenSSH known_hosts line for ``host:port``."""
    name = host if port == 22 else f"[{host}]:{port}"
    kind, b64 = host_key.split()[:2]
    return f"{name} {kind} {b64}\n"
