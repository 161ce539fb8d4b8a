"""How modules compose: typed requests between modules, one provider per request kind.

A module (a service or a hardening control) never names another module. It *requests*
things of a kind (:mod:`selfhost.compose.requests`: a virtual host, a certificate, a port in
a zone, a sysctl value, a backup source, ...) and may *provide* one or more kinds. The router
(:mod:`selfhost.compose.route`) orders the modules so that every request reaches its single
provider, merges requests with each kind's own rule and reports conflicts with the model
paths of both sides.
"""

from selfhost.compose.module import Contribution, Env, Module, Problem
from selfhost.compose.requests import Request

__all__ = ["Contribution", "Env", "Module", "Problem", "Request"]
