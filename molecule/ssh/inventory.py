"""The `ssh` scenario's container over SSH, as its admin alice with sudo (molecule/ssh/deploy.py
sets these variables; the sudo password comes from the environment, never a command line)."""

import os

hosts = [
    ("127.0.0.1", {
        "ssh_port": int(os.environ["SELFHOST_SSH_PORT"]),
        "ssh_user": "alice",
        "ssh_key": os.environ["SELFHOST_SSH_KEY"],
        "ssh_known_hosts_file": os.environ["SELFHOST_SSH_KNOWN_HOSTS"],
        "ssh_strict_host_key_checking": "accept-new",
        "ssh_allow_agent": False,
        "ssh_look_for_keys": False,
        "_sudo": True,
        "_sudo_password": os.environ["SELFHOST_SSH_SUDO_PASSWORD"],
        "selfhost_config": os.environ["SELFHOST_SSH_MODEL"],
    }),
]
