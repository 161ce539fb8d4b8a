"""The friend's backup host: sftp repositories kept by another host of the same inventory.

The user writes the relation once, on the client (``type: sftp, peer: <inventory name>``).
Both ends are then known at plan time:

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

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from selfhost.backup.restic import peer_user
from selfhost.services.base import Command, Contribution, ManagedDir, ManagedFile, Unit

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


def ensure_keypair(path: Path) -> str:
    """Create an Ed25519 key pair at ``path`` if missing; return the public key line."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.parent.chmod(0o700)
    if not path.exists():
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
             f"selfhost-backup {path.name}", "-f", str(path)],
            check=True, stdin=subprocess.DEVNULL,
        )
    path.chmod(0o600)
    return path.with_name(path.name + ".pub").read_text().strip()


def clients_of(peer_names: set[str],
               fleet: dict[str, Server]) -> list[tuple[Server, Repository]]:
    """The (client, repository) pairs keeping a repository on the host known as any of
    ``peer_names`` (its inventory name or its model's host name)."""
    out = []
    for name in sorted(fleet):
        server = fleet[name]
        if not server.backup.active:
            continue
        for repo in server.backup.repositories:
            if repo.type == "sftp" and repo.peer in peer_names:
                out.append((server, repo))
    return out


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
