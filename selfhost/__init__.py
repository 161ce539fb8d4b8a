"""selfhost: describe a home server once, as typed data; get a hardened, backed-up Debian server.

Layers (each importable on its own):

- :mod:`selfhost.models` -- Pydantic models of a server (admins, hardening, services, backup).
- :mod:`selfhost.services` -- one module per service: its model and what it contributes.
- :mod:`selfhost.compile` -- pure functions from a model to an ordered, deterministic plan.
- :mod:`selfhost.backend` -- the thin pyinfra layer that applies a plan to a host.
- :mod:`selfhost.config` -- YAML loading with precise, all-at-once error reporting.
"""

__version__ = "0.1.0"
