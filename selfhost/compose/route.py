"""Routing: order a host's modules, run their requests, merge them kind by kind, report
conflicts. Pure: used by validation (no target) and by the compiler (with a target).

Order: a module that *uses* a kind runs before the module that *provides* it, so a provider
sees every request of its kinds (and may request further kinds from providers after it). The
wiring is declared by each module's ``provides``/``uses``; a cycle is a programming error.

Requests addressed to another host of the fleet (:data:`~selfhost.compose.requests.CROSS_HOST`)
are delivered to that host before its own modules run.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from selfhost.compose.module import Env, Loc, Module, Problem
from selfhost.compose.requests import CROSS_HOST, Port, Request, Sendmail, Sysctl

if TYPE_CHECKING:
    from selfhost.compile.target import Target
    from selfhost.compose.keys import KeyStore
    from selfhost.models.fleet import Fleet

Modules = list[tuple[str, Module]]


def loc_of(origin: str) -> Loc:
    """Model path of an origin (``services.web.sites.0`` -> ``("services", "web", "sites", 0)``)."""
    return tuple(int(p) if p.isdigit() else p for p in origin.split(".") if p)


def order(modules: Modules) -> Modules:
    """Modules in an order where each provider comes after every module that may use its
    kinds (stable: otherwise the given order)."""
    provider: dict[type[Request], int] = {}
    for i, (path, m) in enumerate(modules):
        for kind in m.provides:
            if kind in provider:
                raise RuntimeError(f"{kind.__name__} has two providers: "
                                   f"{modules[provider[kind]][0]} and {path}")
            provider[kind] = i
    before: dict[int, set[int]] = defaultdict(set)  # provider -> modules that must precede
    for i, (_, m) in enumerate(modules):
        for kind in m.uses:
            p = provider.get(kind)
            if p is not None and p != i:
                before[p].add(i)
    out: list[int] = []
    placed: set[int] = set()
    while len(out) < len(modules):
        # The first module (in the given order) whose users are all placed.
        ready = next((i for i in range(len(modules))
                      if i not in placed and before[i] <= placed), None)
        if ready is None:
            left = [modules[i][0] for i in range(len(modules)) if i not in placed]
            raise RuntimeError(f"modules depend on each other in a cycle: {', '.join(left)}")
        out.append(ready)
        placed.add(ready)
    return [modules[i] for i in out]


@dataclass
class Routed:
    """One host's modules in order, with every request routed and merged."""

    host: str
    modules: Modules
    requests: dict[type[Request], list[Request]] = field(default_factory=dict)
    outgoing: list[Request] = field(default_factory=list)
    """Requests for other hosts of the fleet."""
    problems: list[Problem] = field(default_factory=list)

    def env(self, fleet: Fleet, path: str, target: Target | None = None,
            keys: KeyStore | None = None) -> Env:
        return Env(server=fleet.hosts[self.host], host=self.host, fleet=fleet, path=path,
                   target=target, keys=keys, routed=self.requests)


def route_host(fleet: Fleet, host: str, modules: Modules,
               delivered: list[Request] | None = None) -> Routed:
    """Run the requests of ``host``'s modules in order; ``delivered`` are requests that other
    hosts addressed to it."""
    routed = Routed(host, order(modules))
    for r in delivered or []:
        routed.requests.setdefault(type(r), []).append(r)
    for path, module in routed.modules:
        env = routed.env(fleet, path)
        for r in module.requests(env):
            if not r.origin:
                r = dataclasses.replace(r, origin=path)
            if isinstance(r, CROSS_HOST):
                routed.outgoing.append(r)
            else:
                routed.requests.setdefault(type(r), []).append(r)
    routed.requests = {k: merge(v, routed.problems) for k, v in routed.requests.items()}
    return routed


def route_fleet(fleet: Fleet, modules_of: dict[str, Modules]) -> dict[str, Routed]:
    """Every host routed, cross-host requests delivered (hosts that receive some are routed
    again with them; a cross-host request never depends on another host's requests)."""
    out = {h: route_host(fleet, h, modules_of[h]) for h in fleet.hosts}
    inbox: dict[str, list[Request]] = defaultdict(list)
    for routed in out.values():
        for r in routed.outgoing:
            target = fleet.find(getattr(r, "on_host", ""))
            if target is None:
                routed.problems.append(Problem(
                    loc_of(r.origin), f"{r.describe()}: no host {getattr(r, 'on_host', '')!r} "
                    f"in this fleet (hosts: {', '.join(sorted(fleet.hosts))})"))
            else:
                inbox[target].append(r)
    for h, delivered in inbox.items():
        problems = out[h].problems
        out[h] = route_host(fleet, h, modules_of[h], delivered)
        out[h].problems[:0] = [p for p in problems if p not in out[h].problems]
    return out


def merge(requests: list[Request], problems: list[Problem]) -> list[Request]:
    """Requests of one kind, deduplicated; same-key requests that differ are conflicts."""
    if requests and isinstance(requests[0], Sysctl):
        return _merge_sysctl([r for r in requests if isinstance(r, Sysctl)], problems)
    if any(isinstance(r, Sendmail) and not r.fallback for r in requests):
        # A fallback holder of the sendmail role (msmtp) steps back for a real one.
        requests = [r for r in requests if not (isinstance(r, Sendmail) and r.fallback)]
    out: list[Request] = []
    kept: set[Request] = set()  # `out` as a set: `r in out` made 1000 sites cost 500,000 __eq__
    by_key: dict[object, list[Request]] = {}

    def keep(r: Request) -> None:
        out.append(r)
        with contextlib.suppress(TypeError):
            kept.add(r)

    for r in requests:
        try:
            if r in kept:
                continue
        except TypeError:  # a request with an unhashable field: compare one by one
            if r in out:
                continue
        key = r.key()
        earlier = by_key.get(key, []) if key is not None else []
        if earlier:
            first = earlier[0]
            if first.origin == r.origin:
                keep(r)  # one module's own business (a port in two zones)
                continue
            if r.shared and dataclasses.replace(first, origin=r.origin) == r:
                continue  # the same thing asked by two modules, where that is allowed
            clash = next((e for e in earlier if e.origin != r.origin and e.overlaps(r)), None)
            if clash is not None:
                # One binds given addresses, the other every address: say the way out.
                hint = (" (bind them to different addresses)"
                        if isinstance(r, Port) and isinstance(clash, Port)
                        and bool(r.bind) != bool(clash.bind) else "")
                problems.append(Problem(
                    loc_of(r.origin),
                    f"{r.describe()} is requested by both {clash.origin} and {r.origin}"
                    f"{hint}", other=loc_of(clash.origin)))
                continue
        if key is not None:
            by_key.setdefault(key, []).append(r)
        keep(r)
    return out


def _merge_sysctl(requests: list[Sysctl], problems: list[Problem]) -> list[Request]:
    """One value per key: the lowest priority number wins; two different values at the
    winning priority conflict."""
    by_name: dict[str, list[Sysctl]] = defaultdict(list)
    for r in requests:
        by_name[r.name].append(r)
    out: list[Request] = []
    for name in sorted(by_name):
        rs = by_name[name]
        best = min(r.priority for r in rs)
        winners = [r for r in rs if r.priority == best]
        values = {r.value for r in winners}
        if len(values) > 1:
            a, b = winners[0], next(r for r in winners if r.value != winners[0].value)
            problems.append(Problem(
                loc_of(b.origin),
                f"sysctl {name}: {b.origin} wants {b.value!r} but {a.origin} wants "
                f"{a.value!r} (same priority {best})", other=loc_of(a.origin)))
        out.append(winners[0])
    return out
