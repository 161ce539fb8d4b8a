"""The backup scenario's two containers: the server and the friend's backup host (one network
namespace, so sftp goes to 127.0.0.1:2222), both deployed from one fleet file, each host
naming its part of it (``selfhost_host``). Names from SELFHOST_BACKUP_HOSTS (server,friend)."""

import os
from pathlib import Path

_fleet = str(Path(__file__).resolve().parent / "fleet.yaml")
_nas, _friend = (os.environ.get("SELFHOST_BACKUP_HOSTS") or "bk-nas-bookworm,bk-friend-bookworm").split(",")

hosts = [
    (f"@podman/{_nas}", {"selfhost_config": _fleet, "selfhost_host": "nas"}),
    (f"@podman/{_friend}", {"selfhost_config": _fleet, "selfhost_host": "friend"}),
]
