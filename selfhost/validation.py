"""Validation of a whole model, apart from compilation: the cross-field assertions of each
host (lockouts), every module's assertions, and the conflicts between requests (two services
on one port or one host name, two sendmail providers, contradicting sysctls). Pure and
target-free; every problem carries the model path it is about (and the other side's)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from selfhost.compose.module import Problem
from selfhost.compose.route import Modules, Routed, loc_of, route_fleet

if TYPE_CHECKING:
    from selfhost.models.fleet import Fleet
    from selfhost.models.server import Server


def route(fleet: Fleet) -> dict[str, Routed]:
    """Every host's modules routed (the first half of compilation, target-free)."""
    modules: dict[str, Modules] = {h: s.modules() for h, s in fleet.hosts.items()}
    return route_fleet(fleet, modules)


def validate_fleet(fleet: Fleet, routed: dict[str, Routed] | None = None
                   ) -> dict[str, list[Problem]]:
    """Every problem of every host, by host name (hosts without problems are absent).
    ``routed``: the fleet already routed by :func:`route` (routing is pure: the compiler
    passes its own rather than routing twice)."""
    out: dict[str, list[Problem]] = {}
    routed = route(fleet) if routed is None else routed
    for host, server in fleet.hosts.items():
        problems = host_assertions(server) + list(routed[host].problems)
        r = routed[host]
        provided = {k for _, m in r.modules for k in m.provides}
        for kind, reqs in r.requests.items():
            if kind not in provided and reqs:
                for req in reqs:
                    problems.append(Problem(loc_of(req.origin), f"{req.describe()}: no module "
                                            "on this host provides it (is its provider switched "
                                            "off?)"))
        for path, module in r.modules:
            problems += module.assertions(r.env(fleet, path))
        uniq: list[Problem] = []
        for p in problems:
            if p not in uniq:
                uniq.append(p)
        if uniq:
            out[host] = uniq
    return out


def host_assertions(server: Server) -> list[Problem]:
    """What would lock the owner out (NixOS-style assertions on one host's model)."""
    problems: list[Problem] = []
    ssh = server.hardening.ssh
    names: set[str] = set()
    for i, admin in enumerate(server.admins):
        if admin.name in names:
            problems.append(Problem(("admins", i, "name"), f"admin {admin.name!r} is listed twice"))
        names.add(admin.name)
        if not admin.ssh_keys and not ssh.password_authentication:
            problems.append(Problem(
                ("admins", i, "ssh_keys"),
                f"admin {admin.name!r} has no SSH key and password logins are off: "
                "they could never log in"))
        if ssh.password_authentication and not admin.has_password:
            problems.append(Problem(
                ("admins", i, "password"),
                "password logins are on, so every admin needs a password (or password_hash)"))
    if not any(a.sudo for a in server.admins):
        problems.append(Problem(("admins",), "no admin has sudo: with root logins off, nobody "
                                "could administer the server"))
    for loc, msg in server.weak_passwords():
        problems.append(Problem(loc, msg))
    return problems


class ModelError(ValueError):
    """A model that parses but fails validation (assertions, request conflicts)."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{'.'.join(map(str, p.loc))}: {p.message}"
                                   for p in problems))

    def errors(self) -> list[dict[str, Any]]:
        """The problems in the shape of one Pydantic error of type ``assertions``."""
        return [{"type": "assertions", "loc": (), "msg": str(self),
                 "ctx": {"problems": [[list(p.loc), p.message] for p in self.problems]}}]


def validated(data: Any) -> Server:
    """A one-server model (a Server or its data), fully validated: the Python-side
    equivalent of ``selfhost validate``. Raises Pydantic's ``ValidationError`` for a wrong
    field, :class:`ModelError` for problems across fields and modules."""
    from selfhost.models.fleet import Fleet
    from selfhost.models.server import Server

    server = data if isinstance(data, Server) else Server.model_validate(data)
    problems = [p for p in validate_fleet(Fleet.of(server)).get(server.hostname, [])
                if p.severity == "error"]
    if problems:
        raise ModelError(problems)
    return server


def validated_fleet(fleet: Fleet) -> Fleet:
    """A fleet, fully validated (see :func:`validated`)."""
    problems = [p for ps in validate_fleet(fleet).values() for p in ps if p.severity == "error"]
    if problems:
        raise ModelError(problems)
    return fleet
