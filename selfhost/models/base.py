"""Shared building blocks for every model: strict base class, secret references, validators."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "Domain",
    "Hostname",
    "Port",
    "Reason",
    "SecretRef",
    "StrictModel",
]


# Characters that can end a line or hide in one in some file format the compiler writes:
# C0 and C1 controls (NUL, tab, line feed, carriage return, escape, NEL...), DEL, the Unicode
# line and paragraph separators, and lone surrogates (which no UTF-8 file can hold).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_MULTILINE_OK = frozenset("\n\t")
_CHAR_NAMES = {
    0x00: "NUL", 0x09: "tab", 0x0A: "line feed", 0x0D: "carriage return", 0x1B: "escape",
    0x7F: "delete", 0x85: "next line", 0x2028: "line separator",
    0x2029: "paragraph separator",
}


def describe_char(char: str) -> str:
    """``U+000A (line feed)``: how an error message names a character."""
    code = ord(char)
    name = _CHAR_NAMES.get(code)
    if name is None and 0xD800 <= code <= 0xDFFF:
        name = "lone surrogate"
    return f"U+{code:04X}" + (f" ({name})" if name else "")


def find_control(value: Any, allow: frozenset[str] = frozenset(),
                 at: tuple[Any, ...] = ()) -> tuple[tuple[Any, ...], str] | None:
    """The first control character in ``value`` (a string, or strings inside lists, tuples,
    sets and dict keys and values; models are checked on their own), as (sub-path, char).

    A dict key's sub-path ends with ``"[key]"`` (Pydantic's marker for a key's own error).
    """
    if isinstance(value, str):
        for m in _CONTROL.finditer(value):
            if m.group() not in allow:
                return at, m.group()
        return None
    if isinstance(value, BaseModel):
        return None
    if isinstance(value, Mapping):
        for k, v in value.items():
            found = find_control(k, allow, (*at, k, "[key]")) or \
                find_control(v, allow, (*at, k))
            if found:
                return found
        return None
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            found = find_control(v, allow, (*at, i))
            if found:
                return found
        return None
    if isinstance(value, set | frozenset):
        for v in sorted(value, key=repr):
            found = find_control(v, allow, at)
            if found:
                return found
    return None


class StrictModel(BaseModel):
    """Base for all selfhost models: unknown keys are errors, values are validated on assignment.

    No string of any model may hold a control character (see :func:`find_control`): every
    string ends up in some generated file (sshd_config, authorized_keys, nftables, Caddyfile,
    unit files, shell), where a line break would add a line or a directive. A field that is
    meant to hold several lines (a banner) is listed in ``multiline_fields``: line feeds and
    tabs are allowed there, nothing else.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, str_strip_whitespace=True)

    multiline_fields: ClassVar[frozenset[str]] = frozenset()

    @field_validator("*", mode="after")
    @classmethod
    def _no_control_characters(cls, value: Any, info: ValidationInfo) -> Any:
        multiline = info.field_name in cls.multiline_fields
        found = find_control(value, _MULTILINE_OK if multiline else frozenset())
        if found is None:
            return value
        at, char = found
        where = "a key" if at and at[-1] == "[key]" else "a value"
        rule = ("only line feeds and tabs are allowed in this text" if multiline
                else f"{where} must be one line of printable text")
        raise PydanticCustomError(
            "control_character",
            "control character {char} is not allowed: {rule}",
            {"char": describe_char(char), "rule": rule, "at": list(at)},
        )


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
