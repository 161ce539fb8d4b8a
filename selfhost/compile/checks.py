"""Cross-field assertions on a server model (NixOS-style): what would lock the owner out,
what conflicts. Each problem carries the field path it is about."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from selfhost.models.server import Server

Loc = tuple[str | int, ...]


def assertions(server: Server) -> list[tuple[Loc, str]]:
    from selfhost.compile.compiler import collect
    from selfhost.compile.target import Target

    problems: list[tuple[Loc, str]] = []
    ssh = server.hardening.ssh
    names: set[str] = set()
    for i, admin in enumerate(server.admins):
        if admin.name in names:
            problems.append((("admins", i, "name"), f"admin {admin.name!r} is listed twice"))
        names.add(admin.name)
        if not admin.ssh_keys and not ssh.password_authentication:
            problems.append((
                ("admins", i, "ssh_keys"),
                f"admin {admin.name!r} has no SSH key and password logins are off: "
                "they could never log in",
            ))
        if ssh.password_authentication and not admin.has_password:
            problems.append((
                ("admins", i, "password"),
                "password logins are on, so every admin needs a password (or password_hash)",
            ))
    if not any(a.sudo for a in server.admins):
        problems.append((("admins",), "no admin has sudo: with root logins off, nobody could "
                         "administer the server"))
    if not server.hardening.firewall.lan and server.hardening.firewall.enabled:
        for name, svc in ((n, getattr(server.services, n)) for n in type(server.services).model_fields):
            if svc is not None and svc.enabled and getattr(svc, "lan_only", False):
                problems.append((("services", name, "lan_only"),
                                 "lan_only needs at least one network in hardening.firewall.lan"))
    # Ports: two sources on one port/protocol is a conflict.
    owners: dict[tuple[int, str], str] = {}
    for source, contribution in collect(server, Target()):
        if source == "hardening.firewall":
            continue  # extra ports, checked below
        for port in contribution.ports:
            key = (port.port, port.proto)
            if key in owners and owners[key] != source:
                problems.append((
                    _loc(source),
                    f"port {port.port}/{port.proto} is wanted by both {owners[key]} and {source}",
                ))
            owners.setdefault(key, source)
    for i, extra in enumerate(server.hardening.firewall.extra_ports):
        key = (extra.port, extra.proto)
        if key in owners:
            problems.append((
                ("hardening", "firewall", "extra_ports", i, "port"),
                f"port {extra.port}/{extra.proto} is already opened by {owners[key]}; "
                "remove it from extra_ports",
            ))
    return problems


def _loc(source: str) -> Loc:
    return tuple(source.split("."))
