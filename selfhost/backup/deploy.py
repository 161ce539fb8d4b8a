"""pyinfra side of the backups: the parts that need the deploying machine or other hosts.

:func:`selfhost.backup.restic.contribute` is pure and goes into the normal plan. This module
adds what cannot be known from one model alone:

- on a host that keeps other hosts' sftp repositories (``peer:``), the receiving accounts
  (:func:`selfhost.backup.fleet.receiver_contribution`), applied as a small plan;
- on a client, the SSH private key of each sftp repository (uploaded as a secret, masked in
  pyinfra's output) and the known_hosts entry, the peer's host key being read from the peer.

Use it after ``home_server()`` in a deploy file::

    from selfhost.backup.deploy import backup_fleet
    backup_fleet()
"""

from __future__ import annotations

from pyinfra.api.deploy import deploy
from pyinfra.api.exceptions import DeployError
from pyinfra.api.facts import FactBase
from pyinfra.context import host, inventory

from selfhost.backend.pyinfra import _get_state, apply_plan, load, managed_file
from selfhost.backend.state import Query
from selfhost.backup.fleet import (
    PeerClient,
    clients_of,
    ensure_keypair,
    key_path,
    known_hosts_line,
    receiver_contribution,
)
from selfhost.backup.restic import key_file, known_hosts_file, peer_user, sftp_endpoint
from selfhost.compile.plan import (
    Directory,
    File,
    Packages,
    Plan,
    Reload,
    Run,
    Step,
    UnitState,
)
from selfhost.models.server import Server
from selfhost.services.base import Contribution


class Ed25519HostKey(FactBase[str]):
    """The host's public Ed25519 SSH host key line."""

    def command(self) -> str:
        return "cat /etc/ssh/ssh_host_ed25519_key.pub 2>/dev/null || true"

    def process(self, output: list[str]) -> str:
        return output[0].strip() if output else ""


def fleet_models() -> dict[str, Server]:
    """Every inventory host's model, by inventory host name."""
    out: dict[str, Server] = {}
    for h in inventory:
        cfg = h.data.get("selfhost_config")
        if cfg:
            out[h.name] = load(cfg)
    return out


def contribution_plan(c: Contribution, hostname: str) -> Plan:
    """A contribution as plan steps, in the compiler's order."""
    steps: list[Step] = []
    if c.packages:
        steps.append(Packages(tuple(sorted(set(c.packages)))))
    steps += [Run(cmd, "backup") for cmd in c.commands if not cmd.on_change]
    steps += [Directory(d, "backup") for d in c.directories]
    steps += [File(f, "backup") for f in c.files]
    steps += [Run(cmd, "backup") for cmd in c.commands if cmd.on_change]
    steps += [UnitState(u.name, running=u.running, enabled=u.enabled) for u in c.units]
    steps += [Reload(u.name, u.reload_on, "reload" if u.reload else "restart")
              for u in c.units if u.reload_on]
    return Plan(hostname=hostname, release="", steps=steps)


def _names(name: str, server: Server) -> set[str]:
    return {name, server.hostname, server.fqdn}


@deploy("selfhost backups: peers and keys")
def backup_fleet(config: str | None = None) -> None:
    """Prepare both ends of the sftp ``peer`` repositories involving the current host."""
    fleet = fleet_models()
    path = config or host.data.get("selfhost_config")
    if not path:
        raise DeployError("no model: pass config=... or set host data selfhost_config")
    server = load(path)
    fleet[host.name] = server

    # 1. This host keeps other hosts' repositories.
    clients = [
        PeerClient(client.hostname, repo.name, ensure_keypair(key_path(client, repo)))
        for client, repo in clients_of(_names(host.name, server), fleet)
    ]
    if clients:
        apply_plan(contribution_plan(receiver_contribution(clients), server.fqdn), server)

    # 2. This host's own sftp repositories: private key and known_hosts.
    if not server.backup.active:
        return
    uploads: list[tuple[str, bytes, bool]] = []
    for repo in server.backup.repositories:
        if repo.type != "sftp":
            continue
        priv = key_path(server, repo)
        ensure_keypair(priv)
        addr, port, _, _ = sftp_endpoint(server, repo)
        if repo.peer is not None:
            peer = _find_peer(repo.peer, fleet)
            host_key = peer.get_fact(Ed25519HostKey)
            if not host_key:
                raise DeployError(f"cannot read the SSH host key of peer {repo.peer}")
            if repo.host is None:
                addr = str(peer.data.get("ssh_hostname") or peer.name)
        else:
            host_key = str(repo.host_key)
        uploads.append((key_file(repo), priv.read_bytes(), True))
        uploads.append((known_hosts_file(repo),
                        known_hosts_line(addr, port, host_key).encode(), False))
    if not uploads:
        return
    state = _get_state(Query(files=tuple(p for p, _, _ in uploads)))
    for p, content, secret in uploads:
        managed_file(name=f"{'Secret file' if secret else 'File'} {p}", path=p,
                     content=content, mode="0600", owner="root", group="root",
                     validate=None, state=state, secret=secret)


def _find_peer(peer: str, fleet: dict[str, Server]):  # type: ignore[no-untyped-def]
    for h in inventory:
        model = fleet.get(h.name)
        if h.name == peer or (model is not None and peer in _names(h.name, model)):
            return h
    raise DeployError(f"backup peer {peer!r} is not a host of this inventory")


__all__ = ["backup_fleet", "contribution_plan", "fleet_models", "peer_user"]
