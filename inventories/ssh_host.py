"""A real server reached over SSH. Copy this file and adapt it.

    pyinfra inventories/ssh_host.py deploys/home_server.py

Log in as an admin from the model (key-based), with sudo. On a brand-new server, the first
deploy may use the account the installer created; selfhost keeps the SSH port in use open.

If sudo asks for the admin's password, give it here from the environment (or a file), e.g.
``"_sudo_password": os.environ["NAS_SUDO_PASSWORD"]``, or run pyinfra with
``--same-sudo-password``: selfhost keeps it out of every command line on the server.
"""

hosts = [
    (
        "nas.example.org",
        {
            "ssh_user": "alice",
            "ssh_port": 22,
            "_sudo": True,
            "selfhost_config": "examples/home.yaml",
        },
    ),
    # A second server with its own model, deployed by the same run:
    # ("vps.example.org", {"ssh_user": "alice", "_sudo": True,
    #                      "selfhost_config": "servers/vps.yaml"}),
]
