#!/usr/bin/python3
"""Managed by selfhost: make Mailman's lists what the model says (installed on the server as
/usr/local/lib/selfhost/mailman-lists and run as Mailman's user, ``list``).

Reads the JSON file given as the first argument: ``{"lists": [{"address", "owners",
"posting", "nonmembers", "subscription", "archive", "description"}]}``. Creates the missing
domains and lists, then sets each list's owners and policies. Nothing is ever deleted: a list
removed from the model keeps its members and archive. With ``--check`` it changes nothing and
exits 1 if anything differs (the deploy's guard). Uses Mailman's own Python API in-process (as
``mailman withlist`` does), so no REST server, port or password is needed.

Python's standard library and Debian's mailman3 only.
"""

from __future__ import annotations

import json
import sys

CONFIG = "/etc/mailman3/mailman.cfg"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    args = [a for a in argv if a != "--check"]
    with open(args[0], encoding="utf-8") as f:
        wanted = json.load(f)["lists"]

    from mailman.core.initialize import initialize
    initialize(CONFIG)
    from mailman.app.lifecycle import create_list
    from mailman.config import config
    from mailman.interfaces.action import Action
    from mailman.interfaces.archiver import ArchivePolicy
    from mailman.interfaces.domain import IDomainManager
    from mailman.interfaces.listmanager import IListManager
    from mailman.interfaces.mailinglist import SubscriptionPolicy
    from mailman.interfaces.member import MemberRole
    from mailman.interfaces.usermanager import IUserManager
    from zope.component import getUtility

    domains = getUtility(IDomainManager)
    lists = getUtility(IListManager)
    users = getUtility(IUserManager)
    member_action = {"members": Action.defer, "open": Action.defer,
                     "moderated": Action.hold}
    nonmember_action = {"hold": Action.hold, "reject": Action.reject,
                        "discard": Action.discard}
    changes: list[str] = []

    for spec in wanted:
        address = spec["address"]
        domain = address.split("@", 1)[1]
        if domains.get(domain) is None:
            changes.append(f"domain {domain} created")
            if not check:
                domains.add(domain)
        mlist = lists.get(address)
        if mlist is None:
            changes.append(f"list {address} created")
            if check:
                continue
            mlist = create_list(address)
        owners = {m.address.email: m for m in mlist.owners.members}
        for owner in spec["owners"]:
            if owner not in owners:
                changes.append(f"{address}: owner {owner} added")
                if not check:
                    addr = users.get_address(owner)
                    if addr is None:
                        addr = next(iter(users.make_user(owner).addresses))
                    mlist.subscribe(addr, MemberRole.owner)
        for email, member in owners.items():
            if email not in spec["owners"]:
                changes.append(f"{address}: owner {email} removed")
                if not check:
                    member.unsubscribe()
        posting = spec["posting"]
        settings = {
            "subscription_policy": SubscriptionPolicy[spec["subscription"]],
            "default_member_action": member_action[posting],
            "default_nonmember_action": (Action.accept if posting == "open"
                                         else nonmember_action[spec["nonmembers"]]),
            "archive_policy": ArchivePolicy[spec["archive"]],
            "description": spec["description"],
            "advertised": False,
        }
        for name, value in settings.items():
            if getattr(mlist, name) != value:
                changes.append(f"{address}: {name} = {value}")
                if not check:
                    setattr(mlist, name, value)
    if not check:
        config.db.commit()
    for line in changes:
        print(line)
    return 1 if (check and changes) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
