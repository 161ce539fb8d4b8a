"""The backup scenario's two containers: the server and the friend's backup host (one network
namespace, so sftp goes to 127.0.0.1:2222). Names from SELFHOST_BACKUP_HOSTS (server,friend)."""

import os
from pathlib import Path

_repo = Path(__file__).resolve().parents[2]
_nas, _friend = (os.environ.get("SELFHOST_BACKUP_HOSTS") or "bk-nas-bookworm,bk-friend-bookworm").split(",")

hosts = [
    (f"@podman/{_nas}", {"selfhost_config": str(_repo / "examples" / "backup.yaml")}),
    (f"@podman/{_friend}", {"selfhost_config": str(_repo / "examples" / "backup-friend.yaml")}),
]
