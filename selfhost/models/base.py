"""Shared building blocks for every model: strict base class, secret references, validators."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "Domain",
    "Hostname",
    "Port",
    "Reason",
    "SecretRef",
    "StrictModel",
]


class StrictModel(BaseModel):
    """Base for all selfhost models: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, str_strip_whitespace=True)


_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_HOSTNAME_RE = re.compile(rf"^{_LABEL}$")
_DOMAIN_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})+$")


def _hostname(value: str) -> str:
    if not _HOSTNAME_RE.match(value):
        raise ValueError(
            "a hostname is one DNS label: 1-63 lowercase letters, digits or '-', "
            "not starting or ending with '-' (put the rest in `domain`)"
        )
    return value


def _domain(value: str) -> str:
    value = value.rstrip(".")
    if not _DOMAIN_RE.match(value):
        raise ValueError(
            "a domain is two or more DNS labels separated by '.', each 1-63 lowercase "
            "letters, digits or '-' (e.g. 'example.org' or 'home.arpa')"
        )
    if value.split(".")[-1].isdigit():
        raise ValueError("a domain cannot end in a numeric label (is this an IP address?)")
    return value


Hostname = Annotated[str, AfterValidator(_hostname)]
"""A single DNS label (RFC 1123), lowercase."""

Domain = Annotated[str, AfterValidator(_domain)]
"""A DNS domain with at least two labels, lowercase, without a trailing dot."""

Port = Annotated[int, Field(ge=1, le=65535)]
"""A TCP or UDP port number."""

Reason = Annotated[str, Field(min_length=3, description="Why this exception is acceptable.")]


class SecretRef(StrictModel):
    """Where a secret lives; the secret itself never appears in the YAML file.

    Exactly one of ``env`` (read on the machine that runs the deploy) or ``file`` (a path on
    that machine, readable only by its owner) must be set.
    """

    env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of an environment variable on the deploying machine holding the secret.",
    )
    file: str | None = Field(
        default=None,
        description="Path to a file on the deploying machine holding the secret (first line).",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of `env` or `file`")
        return self

    def describe(self) -> str:
        """A log-safe description of where the secret comes from (never its value)."""
        return f"env:{self.env}" if self.env else f"file:{self.file}"

    def resolve(self) -> str:
        """Read the secret's value on the deploying machine. Raises ``LookupError`` if absent."""
        import os
        from pathlib import Path

        if self.env is not None:
            value = os.environ.get(self.env)
            if not value:
                raise LookupError(f"secret environment variable {self.env} is not set")
            return value
        assert self.file is not None
        path = Path(self.file).expanduser()
        try:
            value = path.read_text(encoding="utf-8").splitlines()[0].strip()
        except (OSError, IndexError) as exc:
            raise LookupError(f"cannot read secret file {path}: {exc}") from exc
        if not value:
            raise LookupError(f"secret file {path} is empty")
        return value
