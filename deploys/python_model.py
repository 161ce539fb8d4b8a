"""A deploy that builds its model in Python and adds its own operations: the same as a YAML
file, with the model classes instead of dicts.

    pyinfra INVENTORY deploys/python_model.py

Each inventory host deploys the fleet host of its name (or host data ``selfhost_host``).
"""

from pyinfra.operations import files

import selfhost as sh
from selfhost.backend.pyinfra import home_server

ALICE = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIO15aKF3qdwTP7p24+Rliy7SMGYyMZqFPJES7fSwQd7P "
         "alice@laptop")


def build() -> sh.Fleet:
    """A home server with calendars, backed up to a USB disk."""
    nas = sh.Server(
        hostname="nas", domain="home.arpa", timezone="Europe/Paris",
        admins=[sh.Admin(name="alice", ssh_keys=[ALICE])],
        services=sh.Services(radicale=sh.RadicaleService(users=[
            sh.CalendarUser(name="alice", password=sh.SecretRef(env="DAV_ALICE_PASSWORD")),
        ])),
        backup=sh.BackupPolicy(repositories=[sh.Repository(
            name="usb", type="local", path="/var/backups/restic-usb",
            password=sh.SecretRef(env="SELFHOST_BACKUP_USB_PASSWORD"))]),
    )
    return sh.validated_fleet(sh.Fleet(hosts={"nas": nas}))


if __name__ != "__main__":  # run by pyinfra
    home_server(model=build(), name="nas")
    # Your own operations, after selfhost's.
    files.line(name="A word for whoever logs in", path="/etc/motd",
               line="This server is described in deploys/python_model.py.")
