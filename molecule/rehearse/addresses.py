"""Print the LAN and public addresses of the rehearsed host (SELFHOST_CONFIG, and
SELFHOST_HOST in a fleet), one per line: the create step puts them on each container's
loopback interface, so that the services bound to them (the LAN resolver, Knot on the public
address) answer there as they would on the real server. The VPN addresses are not printed:
the VPN interface brings its own."""

from __future__ import annotations

import os
import sys

from selfhost.config import load_fleet


def main() -> int:
    fleet = load_fleet(os.environ["SELFHOST_CONFIG"])
    name = os.environ.get("SELFHOST_HOST") or next(iter(fleet.hosts))
    key = fleet.find(name)
    if key is None:
        print(f"no host {name!r} in {os.environ['SELFHOST_CONFIG']}", file=sys.stderr)
        return 2
    addresses = fleet.hosts[key].addresses
    for a in (*addresses.public, *addresses.lan):
        print(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
