"""Shared building blocks for every model: strict base class, secret references, validators."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from ipaddress import IPv4Network, IPv6Network
from typing import Annotated, Any, ClassVar, get_args, get_origin

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


SECRET_HOWTO = ("{env: VARIABLE} (an environment variable on the machine that runs the "
                "deploy) or {file: PATH} (a file there, first line)")
PLAINTEXT_SECRET = ("a secret is never written in the model: give a reference to where it is "
                    "kept instead, " + SECRET_HOWTO)


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
    for found in find_controls(value, allow, at):
        return found
    return None


def find_controls(value: Any, allow: frozenset[str] = frozenset(),
                  at: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], str]]:
    """Every string of ``value`` holding a control character: (sub-path, first such char)."""
    if isinstance(value, str):
        for m in _CONTROL.finditer(value):
            if m.group() not in allow:
                yield at, m.group()
                return
    elif isinstance(value, BaseModel):
        return
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from find_controls(k, allow, (*at, k, "[key]"))
            yield from find_controls(v, allow, (*at, k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from find_controls(v, allow, (*at, i))
    elif isinstance(value, set | frozenset):
        for v in sorted(value, key=repr):
            yield from find_controls(v, allow, at)


@functools.cache
def _leaf_types(model: type[BaseModel], name: str) -> frozenset[Any]:
    """The types a field's annotation is made of (unions, containers and Annotated opened)."""
    field = model.model_fields.get(name)
    if field is None:
        return frozenset({bool})
    kinds: set[Any] = set()
    todo = [field.annotation]
    while todo:
        tp = todo.pop()
        args = get_args(tp)
        if get_origin(tp) is Annotated:
            todo.append(args[0])
        elif args:
            todo += [a for a in args if a is not Ellipsis]
        else:
            kinds.add(tp)
    return frozenset(kinds)


def _what(kinds: frozenset[Any]) -> str:
    if kinds & {IPv4Network, IPv6Network}:
        return "a network such as 192.168.1.0/24 or fd00::/8"
    if kinds & {int, float}:
        return "a whole number" if float not in kinds else "a number"
    return "text"


def _find_bool(value: Any, at: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
    if isinstance(value, bool):
        return at
    if isinstance(value, Mapping):
        for k, v in value.items():
            found = _find_bool(v, (*at, k))
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            found = _find_bool(v, (*at, i))
            if found is not None:
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

    # hide_input_in_errors: a secret given by mistake must not end up in a traceback or a log.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, str_strip_whitespace=True,
                              hide_input_in_errors=True)

    multiline_fields: ClassVar[frozenset[str]] = frozenset()

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        # Pydantic reads true as 1 where a number is expected: `port: true` would mean port 1,
        # `allow_from: [true]` the network 0.0.0.1/32.
        if info.field_name is None:
            return value
        kinds = _leaf_types(cls, info.field_name)
        if bool in kinds:
            return value
        if (SecretRef in kinds and str not in kinds and isinstance(value, str | int | float)
                and not isinstance(value, bool)):
            # A secret given as is (a password): say how to reference it instead.
            raise PydanticCustomError("plaintext_secret", PLAINTEXT_SECRET)
        if any(isinstance(k, type) and issubclass(k, BaseModel) for k in kinds):
            return value  # a model refuses a boolean itself; its fields check their own
        at = _find_bool(value)
        if at is not None:
            found = value
            for seg in at:
                found = found[seg]
            raise PydanticCustomError(
                "boolean_not_allowed", "expected {what}, not {value} (a boolean)",
                {"what": _what(kinds), "value": str(found).lower(), "at": list(at)})
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _no_control_characters(cls, value: Any, info: ValidationInfo) -> Any:
        multiline = info.field_name in cls.multiline_fields
        found = list(find_controls(value, _MULTILINE_OK if multiline else frozenset()))
        if not found:
            return value

        def message(at: tuple[Any, ...], char: str) -> str:
            where = "a key" if at and at[-1] == "[key]" else "a value"
            rule = ("only line feeds and tabs are allowed in this text" if multiline
                    else f"{where} must be one line of printable text")
            return f"control character {describe_char(char)} is not allowed: {rule}"

        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise PydanticCustomError(
            "control_character",
            "{message}{more}",
            {"message": message(*found[0]), "more": more, "at": list(found[0][0]),
             # The YAML loader reports each one at its own line and column.
             "found": [[list(at), message(at, char)] for at, char in found]},
        )


_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_HOSTNAME_RE = re.compile(rf"^{_LABEL}$")
_DOMAIN_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})+$")


def data_path(value: str | None, example: str) -> str | None:
    """A data directory of the model: absolute, at least two levels deep, no ``..``, of
    letters, digits and ``._-/`` only (it is written into configuration files). ``example``
    shows one in the error message."""
    from pathlib import PurePosixPath

    if value is None:
        return value
    p = PurePosixPath(value)
    if not p.is_absolute() or ".." in p.parts or len(p.parts) < 3 or \
            not re.fullmatch(r"[A-Za-z0-9._/-]+", value):
        raise ValueError(f"an absolute path at least two levels deep (e.g. {example}), "
                         "of letters, digits, '.', '_', '-' and '/'")
    return str(p)


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
