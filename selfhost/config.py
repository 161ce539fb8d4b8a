"""Load a server description from YAML, safely, with every problem located at FILE:LINE:COL.

The YAML text is never given to a YAML constructor. ruamel.yaml's parser turns it into events
(with line/column marks) and a small composer here builds plain dicts, lists and scalars from
them, following the YAML 1.2 core schema. So no tag is ever interpreted: ``!!python/...``,
``!vault`` and every other non-core tag is refused with an error. Alongside the data it keeps
the position of every mapping key and every value, so that each Pydantic error can be reported
as ``FILE:LINE:COL: field.path: message`` (1-based line and column).

Hostile input is refused before it costs anything: files over :data:`MAX_BYTES`, non-UTF-8
bytes, NUL bytes and control characters, nesting deeper than :data:`MAX_DEPTH`, more than
:data:`MAX_ALIASES` alias uses or more than :data:`MAX_NODES` nodes once aliases are expanded
("billion laughs"), several documents, an empty file, a top level that is not a mapping.

Public API: :func:`load_server`, :func:`load_server_text`, :func:`load_server_bytes` (all
raise :class:`ConfigError`, whose ``issues`` list every problem found), :class:`Issue` and
:func:`server_json_schema`.
"""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import (
    AliasEvent,
    DocumentStartEvent,
    Event,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
)

from selfhost.models.base import PLAINTEXT_SECRET, SECRET_HOWTO
from selfhost.models.fleet import Fleet
from selfhost.models.server import Server

__all__ = [
    "MAX_ALIASES",
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_NODES",
    "ConfigError",
    "Issue",
    "load_server",
    "load_server_bytes",
    "load_server_text",
    "server_json_schema",
]

MAX_BYTES = 1024 * 1024
"""Largest accepted file (a server description is a few kilobytes)."""
MAX_DEPTH = 32
"""Deepest accepted nesting of mappings and lists (the model itself is about 6 deep)."""
MAX_ALIASES = 100
"""Most alias uses (``*name``) accepted in one file."""
MAX_NODES = 10_000
"""Most YAML nodes accepted, counting every node an alias repeats."""

ROOT = "(root)"
"""Field path shown for problems about the whole document."""
NO_FIELD = "-"
"""Field path shown for problems not tied to a field (file, encoding, YAML syntax)."""

Loc = tuple[Any, ...]
Mark = tuple[int, int]


@dataclass(frozen=True)
class Issue:
    """One problem in a configuration file, at a 1-based line and column."""

    file: str
    line: int
    col: int
    path: str
    message: str

    def format(self) -> str:
        # One line per issue, whatever a key, an alias or a value in the file holds.
        return _printable(f"{self.file}:{self.line}:{self.col}: {self.path}: {self.message}")

    def __str__(self) -> str:
        return self.format()


class ConfigError(Exception):
    """The configuration cannot be used; ``issues`` lists every problem found."""

    def __init__(self, issues: Sequence[Issue]) -> None:
        self.issues: list[Issue] = list(issues)
        super().__init__("\n".join(i.format() for i in self.issues))


# --------------------------------------------------------------------------- public API


def load_fleet(path: str | Path) -> Fleet:
    """Read, check and validate a model file: a fleet (``hosts:``) or one server (a fleet of
    one). Relative paths in the model are resolved against the file's directory.

    Raises :class:`ConfigError` listing every problem: YAML, model fields, and the model's
    assertions and request conflicts across modules and hosts (each at its FILE:LINE:COL).
    Warnings (requests a switched-off control does not honour) are in ``fleet.warnings``."""
    p = Path(path)
    name = str(path)
    try:
        if p.is_dir():
            raise ConfigError([Issue(name, 1, 1, NO_FIELD, "is a directory, not a YAML file")])
        with p.open("rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError([Issue(name, 1, 1, NO_FIELD, f"cannot read file: {reason}")]) from None
    return load_fleet_text(_decode(raw, name), name, base_dir=p.parent.resolve())


def load_server(path: str | Path) -> Server:
    """Like :func:`load_fleet`, for a file describing one server."""
    return _one(load_fleet(path), str(path))


def load_server_bytes(data: bytes, filename: str = "<bytes>",
                      base_dir: Path | None = None) -> Server:
    """Like :func:`load_server`, from the bytes of a file."""
    return load_server_text(_decode(data, filename), filename, base_dir=base_dir)


def load_server_text(text: str, filename: str = "<string>",
                     base_dir: Path | None = None) -> Server:
    """Like :func:`load_server`, from YAML text. ``base_dir`` defaults to the current
    directory."""
    return _one(load_fleet_text(text, filename, base_dir), filename)


def _one(fleet: Fleet, filename: str) -> Server:
    if len(fleet.hosts) != 1:
        raise ConfigError([Issue(filename, 1, 1, "hosts", f"describes {len(fleet.hosts)} hosts; "
                                 "this command takes a file of one server (or use a fleet "
                                 "command)")])
    return next(iter(fleet.hosts.values()))


def load_fleet_text(text: str, filename: str = "<string>",
                    base_dir: Path | None = None) -> Fleet:
    """Like :func:`load_fleet`, from YAML text."""
    from selfhost.validation import validate_fleet

    text = _check_text(text, filename)
    doc = _compose(text, filename)
    issues = list(doc.issues)
    fleet: Fleet | None = None
    is_fleet = isinstance(doc.data, dict) and "hosts" in doc.data
    if is_fleet:
        doc.root = Fleet
        _apply_defaults(doc)
    if doc.fatal is None:
        try:
            fleet = (Fleet.model_validate(doc.data) if is_fleet
                     else Fleet.of(Server.model_validate(doc.data)))
        except ValidationError as exc:
            issues += _validation_issues(exc, doc, filename)
    if issues or fleet is None:
        raise ConfigError(_sorted(issues))
    for server in fleet.hosts.values():
        server.with_base_dir(base_dir or Path.cwd())
    errors: list[Issue] = []
    warnings: list[Issue] = []
    for host, problems in validate_fleet(fleet).items():
        prefix: Loc = ("hosts", host) if is_fleet else ()
        for problem in problems:
            issue = _problem_issue(problem, prefix, doc, filename)
            (errors if problem.severity == "error" else warnings).append(issue)
    if errors:
        raise ConfigError(_sorted(errors))
    fleet.warnings = _sorted(warnings)
    return fleet


def _problem_issue(problem: Any, prefix: Loc, doc: _Document, filename: str) -> Issue:
    where = _locate((*prefix, *problem.loc), "assertion", doc)
    message = problem.message
    if problem.other is not None:
        other = _locate((*prefix, *problem.other), "assertion", doc)
        message += f" (the other side: {filename}:{other.mark[0]}:{other.mark[1]})"
    if problem.severity == "warning":
        message = "warning: " + message
    return Issue(filename, where.mark[0], where.mark[1], _fmt_loc(where.path) if where.path
                 else ROOT, message)


def _apply_defaults(doc: _Document) -> None:
    """Merge ``defaults:`` into every host's mapping (the host's own keys win; mappings merge
    key by key), positions included, so errors point at the line they come from."""
    data = doc.data
    defaults, hosts = data.get("defaults"), data.get("hosts")
    if not isinstance(defaults, dict) or not isinstance(hosts, dict) or not defaults:
        return
    dpos = doc.pos.children.get("defaults")
    hpos = doc.pos.children.get("hosts")
    if dpos is None or hpos is None:
        return
    for name, host in hosts.items():
        if isinstance(host, dict) and hpos.children.get(name) is not None:
            _merge_into(host, hpos.children[name], defaults, dpos)


def _merge_into(dst: dict[Any, Any], dpos: _Pos, src: dict[Any, Any], spos: _Pos) -> None:
    import copy

    for key, value in src.items():
        if key not in dst:
            dst[key] = copy.deepcopy(value)
            dpos.keys[key] = spos.keys.get(key, spos.mark)
            if spos.children.get(key) is not None:
                dpos.children[key] = spos.children[key]
        elif isinstance(dst[key], dict) and isinstance(value, dict):
            cd, cs = dpos.children.get(key), spos.children.get(key)
            if cd is not None and cs is not None:
                _merge_into(dst[key], cd, value, cs)


def server_json_schema() -> dict[str, Any]:
    """JSON Schema of a server description, for editors (yaml-language-server)."""
    from pydantic import TypeAdapter

    # One file is either a server or a fleet of servers.
    schema = TypeAdapter(Server | Fleet).json_schema()
    schema.pop("title", None)
    out: dict[str, Any] = {
        # yaml-language-server validates with draft 7; Pydantic's output only needs the
        # `$ref`-with-siblings rewrite below to be valid draft 7.
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "selfhost server description",
    }
    out.update(schema)
    result = _draft7(out)
    assert isinstance(result, dict)
    return result


def _draft7(node: Any) -> Any:
    """In draft 7, keywords beside `$ref` are ignored: move the `$ref` into an `allOf`."""
    if isinstance(node, dict):
        out = {k: _draft7(v) for k, v in node.items()}
        if "$ref" in out and len(out) > 1:
            ref = out.pop("$ref")
            out["allOf"] = [{"$ref": ref}]
        return out
    if isinstance(node, list):
        return [_draft7(v) for v in node]
    return node


# --------------------------------------------------------------------------- raw checks


class _Abort(Exception):
    """Stop reading: the problem makes everything after it meaningless."""

    def __init__(self, issue: Issue) -> None:
        self.issue = issue
        super().__init__(issue.format())


# Characters YAML allows in a stream (the same set ruamel.yaml's reader accepts).
_NON_PRINTABLE = re.compile(
    "[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
)


def _position(text: str, index: int) -> Mark:
    line = text.count("\n", 0, index) + 1
    col = index - (text.rfind("\n", 0, index) + 1) + 1
    return line, col


def _decode(data: bytes, filename: str) -> str:
    def fail(index: int, message: str) -> ConfigError:
        # Line and column in characters, counting the bytes before `index` as UTF-8.
        prefix = data[:index].decode("utf-8", "replace")
        line, col = _position(prefix, len(prefix))
        return ConfigError([Issue(filename, line, col, NO_FIELD, message)])

    if len(data) > MAX_BYTES:
        raise ConfigError([Issue(
            filename, 1, 1, NO_FIELD,
            f"file is too large (more than {MAX_BYTES // 1024} KiB is refused; a server "
            "description is a few KiB)",
        )])
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise fail(0, "the file is UTF-16: save it as UTF-8")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise fail(nul, "binary data (NUL byte): a server description is a UTF-8 YAML text file")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = data[exc.start:exc.start + 1]
        raise fail(exc.start, f"not valid UTF-8 (byte 0x{bad.hex()}): save the file as "
                              "UTF-8") from None


def _check_text(text: str, filename: str) -> str:
    """Refuse text no server description looks like; return it without a byte-order mark."""
    def fail(index: int, message: str) -> ConfigError:
        line, col = _position(text, index)
        return ConfigError([Issue(filename, line, col, NO_FIELD, message)])

    if len(text) > MAX_BYTES:
        raise ConfigError([Issue(filename, 1, 1, NO_FIELD,
                                 f"text is too large (more than {MAX_BYTES // 1024} KiB)")])
    text = text.removeprefix("\ufeff")
    m = _NON_PRINTABLE.search(text)
    if m:
        char = m.group()
        kind = "binary data (NUL character)" if char == "\x00" else "control character"
        raise fail(m.start(), f"{kind} U+{ord(char):04X} is not allowed in a YAML file")
    if not text.strip():
        raise ConfigError([Issue(filename, 1, 1, ROOT, _EMPTY)])
    deep = _flow_too_deep(text)
    if deep is not None:
        raise fail(deep, f"nesting deeper than {MAX_DEPTH} levels is refused")
    return text


_EMPTY = "the file is empty: expected a mapping with at least `hostname`, `domain` and `admins`"

_FLOW_CHARS = re.compile(r"""[\[\]{}'"#]""")
_SINGLE_QUOTED = re.compile(r"'[^']*(?:''[^']*)*'")
_DOUBLE_QUOTED = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def _flow_too_deep(text: str) -> int | None:
    """Index of the first `[` or `{` nested deeper than MAX_DEPTH, roughly (quotes and
    comments are skipped), else None.

    ruamel.yaml's scanner takes quadratic time on deeply nested flow collections, before the
    first event would let the composer count the depth, so this runs first.
    """
    depth = 0
    pos = 0
    while True:
        m = _FLOW_CHARS.search(text, pos)
        if m is None:
            return None
        i = m.start()
        c = m.group()
        prev = text[i - 1] if i else "\n"
        pos = i + 1
        if c == "#":
            if prev in " \t\r\n":
                nl = text.find("\n", i)
                if nl < 0:
                    return None
                pos = nl + 1
        elif c in "'\"":
            if prev in " \t\r\n[{,:":
                q = (_SINGLE_QUOTED if c == "'" else _DOUBLE_QUOTED).match(text, i)
                if q is None:
                    return None  # unterminated: the parser reports it
                pos = q.end()
        elif c in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return i
        else:
            depth = max(0, depth - 1)


# --------------------------------------------------------------------------- composing


@dataclass
class _Pos:
    """Where a node is, and for a mapping or list where its keys and children are."""

    line: int
    col: int
    keys: dict[Any, Mark] = field(default_factory=dict)
    children: dict[Any, _Pos] = field(default_factory=dict)

    @property
    def mark(self) -> Mark:
        return self.line, self.col


class _Merge:
    """The YAML merge key `<<`."""


class _BadKey:
    """A key that could not be used (a mapping or list as a key)."""


_MERGE = _Merge()
_BAD_KEY = _BadKey()
_NO_KEY = object()


@dataclass
class _Frame:
    value: dict[Any, Any] | list[Any]
    pos: _Pos
    path: Loc
    anchor: str | None
    bad_tag: bool = False
    size: int = 1
    key: Any = _NO_KEY
    key_mark: Mark = (1, 1)
    merges: list[tuple[Any, _Pos]] = field(default_factory=list)


@dataclass
class _Document:
    data: Any = None
    pos: _Pos = field(default_factory=lambda: _Pos(1, 1))
    issues: list[Issue] = field(default_factory=list)
    fatal: Issue | None = None
    """Set when no validation is possible (syntax error, limit hit, not a mapping...)."""
    poisoned: list[Loc] = field(default_factory=list)
    root: Any = None
    """The model of the document (default: one Server)."""
    """Paths whose value was refused (a tag): validation errors under them are noise."""


_CORE = "tag:yaml.org,2002:"
_NULLS = {"", "~", "null", "Null", "NULL"}
_TRUES = {"true", "True", "TRUE"}
_FALSES = {"false", "False", "FALSE"}
_INT10 = re.compile(r"[-+]?[0-9]+\Z")
_INT8 = re.compile(r"0o[0-7]+\Z")
_INT16 = re.compile(r"0x[0-9a-fA-F]+\Z")
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?\Z")
_INF = re.compile(r"[-+]?\.(inf|Inf|INF)\Z")
_NAN = re.compile(r"\.(nan|NaN|NAN)\Z")


def _plain(value: str) -> Any:
    """Resolve a plain (unquoted) scalar with the YAML 1.2 core schema."""
    try:
        if value in _NULLS:
            return None
        if value in _TRUES:
            return True
        if value in _FALSES:
            return False
        if _INT10.match(value):
            return int(value)
        if _INT8.match(value):
            return int(value[2:], 8)
        if _INT16.match(value):
            return int(value[2:], 16)
        if _FLOAT.match(value):
            return float(value)
        if _INF.match(value):
            return float("-inf") if value.startswith("-") else float("inf")
        if _NAN.match(value):
            return float("nan")
    except ValueError:  # e.g. an integer of more than 4300 digits: leave it a string
        pass
    return value


_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _printable(text: str) -> str:
    """``text`` with control characters written as Python escapes (``\\n``)."""
    if not _UNPRINTABLE.search(text):
        return text
    return _UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], text)


def _describe_tag(tag: str) -> str:
    return "!!" + tag[len(_CORE):] if tag.startswith(_CORE) else tag


def _fmt_loc(loc: Iterable[Any]) -> str:
    # A key may hold any character: escape those that would break or forge an error line.
    parts = [_printable(str(p)) or "''" for p in loc]
    return ".".join(parts) if parts else ROOT


class _Composer:
    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.doc = _Document()
        self.stack: list[_Frame] = []
        self.anchors: dict[str, tuple[Any, _Pos, int]] = {}
        self.open_anchors: set[str] = set()
        self.nodes = 0
        self.aliases = 0
        self.documents = 0
        self.has_root = False

    # -- helpers
    def issue(self, mark: Mark, loc: Loc | str, message: str) -> Issue:
        path = loc if isinstance(loc, str) else _fmt_loc(loc)
        return Issue(self.filename, mark[0], mark[1], path, message)

    def add_issue(self, mark: Mark, loc: Loc | str, message: str) -> None:
        self.doc.issues.append(self.issue(mark, loc, message))

    def abort(self, mark: Mark, loc: Loc | str, message: str) -> _Abort:
        return _Abort(self.issue(mark, loc, message))

    def child_path(self) -> Loc:
        """Path of the node the next event starts."""
        if not self.stack:
            return ()
        f = self.stack[-1]
        if isinstance(f.value, list):
            return (*f.path, len(f.value))
        if f.key is _NO_KEY or isinstance(f.key, _Merge | _BadKey):
            return f.path
        return (*f.path, f.key)

    def at_key(self) -> bool:
        return bool(self.stack) and isinstance(self.stack[-1].value, dict) \
            and self.stack[-1].key is _NO_KEY

    def count(self, n: int, mark: Mark) -> None:
        self.nodes += n
        if self.nodes > MAX_NODES:
            hint = ("counting what aliases repeat: an alias bomb?" if self.aliases
                    else "a server description has far fewer")
            raise self.abort(mark, self.child_path(),
                             f"more than {MAX_NODES} YAML nodes: refused ({hint})")

    # -- events
    def event(self, ev: Event) -> None:
        mark = (ev.start_mark.line + 1, ev.start_mark.column + 1)
        if isinstance(ev, DocumentStartEvent):
            self.documents += 1
            if self.documents > 1:
                raise self.abort(mark, NO_FIELD, "only one YAML document is allowed per file "
                                                 "(remove the second `---`)")
        elif isinstance(ev, ScalarEvent):
            self.count(1, mark)
            self.scalar(ev, mark)
        elif isinstance(ev, AliasEvent):
            self.alias(ev, mark)
        elif isinstance(ev, MappingStartEvent | SequenceStartEvent):
            self.count(1, mark)
            path = self.child_path()
            if len(self.stack) >= MAX_DEPTH:
                raise self.abort(mark, path, f"nesting deeper than {MAX_DEPTH} levels is "
                                             "refused")
            is_map = isinstance(ev, MappingStartEvent)
            frame = _Frame({} if is_map else [], _Pos(*mark), path, ev.anchor)
            tag = None if ev.tag is None else str(ev.tag)
            if tag is not None and tag != "!" and tag != _CORE + ("map" if is_map else "seq"):
                self.refuse_tag(tag, mark, path)
                frame.bad_tag = True
            if ev.anchor:
                self.open_anchors.add(ev.anchor)
            self.stack.append(frame)
        elif isinstance(ev, MappingEndEvent | SequenceEndEvent):
            frame = self.stack.pop()
            if frame.anchor:
                self.open_anchors.discard(frame.anchor)
            if isinstance(frame.value, dict):
                self.apply_merges(frame)
            value: Any = None if frame.bad_tag else frame.value
            self.add(value, frame.pos, frame.anchor, frame.size)

    def refuse_tag(self, tag: str, mark: Mark, path: Loc) -> None:
        self.add_issue(mark, path, f"YAML tag {_describe_tag(tag)!r} is refused: tags are "
                                   "never interpreted; write a plain value")
        self.doc.poisoned.append(path)

    def scalar(self, ev: ScalarEvent, mark: Mark) -> None:
        tag = None if ev.tag is None else str(ev.tag)
        text = ev.value
        path = self.child_path()
        value: Any
        if tag is None and not ev.implicit[0]:
            value = text  # quoted or block scalar
        elif tag is None:
            value = _MERGE if text == "<<" and self.at_key() else _plain(text)
        elif tag == "!" or tag == _CORE + "str":
            value = text
        elif tag in (_CORE + "int", _CORE + "float", _CORE + "bool", _CORE + "null"):
            value = _plain(text)
            want = {"int": int, "float": float, "bool": bool, "null": type(None)}[
                tag[len(_CORE):]]
            if want is float and type(value) is int:
                value = float(value)
            if type(value) is not want:
                self.add_issue(mark, path, f"{text!r} is not a valid {_describe_tag(tag)}")
                self.doc.poisoned.append(path)
                value = None
        else:
            self.refuse_tag(tag, mark, path)
            value = None
        pos = _Pos(*mark)
        if (tag is None and ev.implicit[0] and text == "" and self.stack
                and isinstance(self.stack[-1].value, dict) and self.stack[-1].key is not _NO_KEY):
            # An empty value (`key:` and nothing): its mark is on the next line; show the key.
            pos = _Pos(*self.stack[-1].key_mark)
        self.add(value, pos, ev.anchor, 1)

    def alias(self, ev: AliasEvent, mark: Mark) -> None:
        name = ev.anchor
        path = self.child_path()
        if name in self.open_anchors:
            raise self.abort(mark, path, f"alias *{name} is inside the node it refers to: "
                                         "recursive structures are refused")
        if name not in self.anchors:
            raise self.abort(mark, path, f"alias *{name} refers to no anchor &{name} above it")
        self.aliases += 1
        if self.aliases > MAX_ALIASES:
            raise self.abort(mark, path, f"more than {MAX_ALIASES} aliases: refused "
                                         "(an alias bomb?)")
        value, target, size = self.anchors[name]
        self.count(size, mark)
        self.add(value, _Pos(mark[0], mark[1], target.keys, target.children), None, size)

    def add(self, value: Any, pos: _Pos, anchor: str | None, size: int) -> None:
        if anchor:
            self.anchors[anchor] = (value, pos, size)
        if not self.stack:
            self.doc.data, self.doc.pos, self.has_root = value, pos, True
            return
        f = self.stack[-1]
        f.size += size
        if isinstance(f.value, list):
            f.pos.children[len(f.value)] = pos
            f.value.append(value)
            return
        if f.key is _NO_KEY:  # this node is a key
            if isinstance(value, dict | list):
                self.add_issue(pos.mark, f.path,
                               "a mapping key must be a plain value, not a "
                               + ("mapping" if isinstance(value, dict) else "list"))
                f.key = _BAD_KEY
            else:
                f.key = value
            f.key_mark = pos.mark
            return
        key, f.key = f.key, _NO_KEY
        if key is _BAD_KEY:
            return
        if key is _MERGE:
            f.merges.append((value, pos))
            return
        if key in f.value:
            first = f.pos.keys[key]
            self.add_issue(f.key_mark, (*f.path, key),
                           f"duplicate key {key!r} (first given at line {first[0]}, column "
                           f"{first[1]}; the first value is used)")
            return
        f.value[key] = value
        f.pos.keys[key] = f.key_mark
        f.pos.children[key] = pos

    def apply_merges(self, f: _Frame) -> None:
        assert isinstance(f.value, dict)
        sources: list[tuple[dict[Any, Any], _Pos]] = []
        for value, pos in f.merges:
            items = [(value, pos)] if isinstance(value, dict) else (
                [(v, pos.children[i]) for i, v in enumerate(value)]
                if isinstance(value, list) else [(value, pos)])
            for v, p in items:
                if isinstance(v, dict):
                    sources.append((v, p))
                else:
                    self.add_issue(p.mark, f.path, "a merge key `<<` needs a mapping (or a "
                                                   "list of mappings) to merge")
        for src, spos in sources:
            for k, v in src.items():
                if k not in f.value:
                    f.value[k] = v
                    f.pos.keys[k] = spos.keys.get(k, spos.mark)
                    f.pos.children[k] = spos.children.get(k, spos)


def _yaml_error_issue(exc: YAMLError, filename: str) -> Issue:
    if isinstance(exc, MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        if "\\t" in problem or "\t" in problem:
            problem = "a tab character where YAML expects indentation or a value: " \
                      "indent with spaces"
        message = f"YAML syntax error: {problem}"
        if exc.problem and exc.context and exc.context_mark is not None:
            cm = exc.context_mark
            if mark is None or (cm.line, cm.column) != (mark.line, mark.column):
                message += f" ({exc.context} at line {cm.line + 1}, column {cm.column + 1})"
            else:
                message += f" ({exc.context})"
        if mark is not None:
            return Issue(filename, mark.line + 1, mark.column + 1, NO_FIELD, message)
        return Issue(filename, 1, 1, NO_FIELD, message)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return Issue(filename, 1, 1, NO_FIELD, f"YAML error: {first}")


def _compose(text: str, filename: str) -> _Document:
    composer = _Composer(filename)
    doc = composer.doc
    yaml = YAML(typ="safe", pure=True)
    try:
        for ev in yaml.parse(text):
            composer.event(ev)
    except _Abort as exc:
        doc.fatal = exc.issue
    except YAMLError as exc:
        doc.fatal = _yaml_error_issue(exc, filename)
    except RecursionError:
        doc.fatal = Issue(filename, 1, 1, NO_FIELD, "YAML nesting is too deep")
    if doc.fatal is None:
        if not composer.has_root or doc.data is None:
            doc.fatal = Issue(filename, 1, 1, ROOT, _EMPTY)
        elif not isinstance(doc.data, dict):
            kind = "a list" if isinstance(doc.data, list) else f"a {type(doc.data).__name__}"
            doc.fatal = Issue(filename, doc.pos.line, doc.pos.col, ROOT,
                              f"the top level must be a mapping (`hostname: ...`, "
                              f"`domain: ...`, ...), not {kind}")
    if doc.fatal is not None:
        doc.issues.append(doc.fatal)
    return doc


# --------------------------------------------------------------------------- validation


def _candidates(tp: Any) -> list[Any]:
    """The concrete types an annotation allows (Annotated, Optional and unions unwrapped)."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _candidates(get_args(tp)[0])
    if origin is Union or origin is types.UnionType:
        return [c for arg in get_args(tp) for c in _candidates(arg)]
    if tp is type(None):
        return []
    return [tp]


def _models(tps: Iterable[Any]) -> list[type[BaseModel]]:
    return [t for t in tps if isinstance(t, type) and issubclass(t, BaseModel)]


def _field_names(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _field(model: type[BaseModel], name: str) -> Any:
    for fname, f in model.model_fields.items():
        if name in (fname, f.alias):
            return f.annotation
    return None


def _step(tps: list[Any], seg: Any) -> list[Any]:
    """The types found one step (a field, an index or a key) inside ``tps``."""
    out: list[Any] = []
    for tp in tps:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if isinstance(seg, str):
                ann = _field(tp, seg)
                if ann is not None:
                    out += _candidates(ann)
            continue
        origin = get_origin(tp) or tp
        args = get_args(tp)
        if not isinstance(origin, type):
            continue
        if issubclass(origin, Mapping) and len(args) == 2:
            out += _candidates(args[1])
        elif (issubclass(origin, Sequence | set | frozenset) and not issubclass(origin, str)
              and args and isinstance(seg, int)):
            out += _candidates(args[0])
    return out


def _suggest(word: Any, choices: Sequence[str]) -> str | None:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


@dataclass
class _Located:
    path: Loc
    mark: Mark
    union_at: Loc | None
    """Path of the value a union-member label was found at (None: no union involved)."""
    parent_types: list[Any]
    parent_data: Any
    key_error: bool = False
    """The problem is with the last key itself, not its value."""


def _locate(loc: Loc, etype: str, doc: _Document) -> _Located:
    """Follow a Pydantic error location through the data, its positions and the model types.

    Segments that are in the data are followed; segments naming a field that is absent (a
    missing key) are kept in the path but the position stays on the mapping that lacks it;
    other segments are union-member labels (``constrained-str``, ``function-after[...]``) and
    are dropped.
    """
    tps: list[Any] = [doc.root or Server]
    parent_tps: list[Any] = [doc.root or Server]
    data: Any = doc.data
    parent_data: Any = None
    pos: _Pos | None = doc.pos
    mark = doc.pos.mark
    path: list[Any] = []
    union_at: Loc | None = None
    key_mark: Mark | None = None
    last_was_key = False
    key_error = False
    for seg in loc:
        if seg == "[key]":
            if key_mark is not None:
                mark = key_mark
            key_error = True
            continue
        last_was_key = False
        if (pos is not None and isinstance(data, dict) and _hashable(seg) and seg in data
                and not isinstance(seg, bool)):
            key_mark = pos.keys.get(seg, pos.mark)
            pos = pos.children.get(seg)
            mark = pos.mark if pos is not None else key_mark
            parent_data, data = data, data[seg]
            last_was_key = True
        elif (pos is not None and isinstance(data, list) and isinstance(seg, int)
              and not isinstance(seg, bool) and 0 <= seg < len(data)):
            pos = pos.children.get(seg)
            mark = pos.mark if pos is not None else mark
            parent_data, data = data, data[seg]
            key_mark = None
        elif isinstance(seg, int) or (isinstance(seg, str) and any(
                _field(m, seg) is not None for m in _models(tps))):
            # Not in the data: a missing field (the position stays on its mapping).
            parent_data, data, pos = data, None, None
        else:
            if union_at is None:
                union_at = tuple(path)
            named = [m for m in _models(tps) if re.search(rf"\b{re.escape(m.__name__)}\b",
                                                           str(seg))]
            if named:
                tps = list(named)
            continue
        path.append(seg)
        parent_tps, tps = tps, _step(tps, seg)
    if etype == "extra_forbidden" and last_was_key and key_mark is not None:
        mark = key_mark
    return _Located(tuple(path), mark, union_at, parent_tps, parent_data, key_error)


def _hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


_PREFIXES = ("Value error, ", "Assertion failed, ")


def _message(etype: str, msg: str, where: _Located) -> str:
    for prefix in _PREFIXES:
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if not where.path:
        return msg
    name = where.path[-1]
    if where.key_error:
        return f"invalid key {name!r}: {msg}"
    allowed = sorted({n for m in _models(where.parent_types) for n in _field_names(m)})
    if etype == "extra_forbidden":
        if not allowed:
            return f"unknown key {name!r}"
        close = _suggest(name, allowed)
        if close:
            return f"unknown key {name!r} (did you mean {close!r}?)"
        return f"unknown key {name!r}; allowed keys: {', '.join(allowed)}"
    if etype == "missing":
        out = f"missing required key {name!r}"
        if isinstance(where.parent_data, dict):
            unknown = [str(k) for k in where.parent_data if k not in allowed]
            close = _suggest(name, unknown)
            if close:
                out += f" (is {close!r} a misspelling of it?)"
        return out
    return msg


# --------------------------------------------------------------------------- readable messages
# Pydantic's own messages speak of its types ("Input should be a valid dictionary or instance
# of SecretRef"); these say what to write instead, in the words of a YAML file.

_NETWORK = "a network such as 192.168.1.0/24 or fd00::/8 (an address alone is ADDRESS/32)"
_PATTERN_HELP = {
    r"^[^@\s]+@[^@\s]+\.[^@\s]+$": "an e-mail address such as alice@example.org",
    r"^[^@\s]+@[^@\s]+$": "an e-mail address such as nas@example.org",
    r"^[A-Za-z_][A-Za-z0-9_]*$": "an environment variable name (letters, digits and '_', "
                                  "not starting with a digit)",
    r"^0[0-7]{2}$": "a umask of three octal digits starting with 0, such as 027",
}


def _kind(value: Any) -> str:
    """What a YAML value is, in YAML's words."""
    if value is None:
        return "an empty value (null)"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, int | float):
        return f"the number {value!r}" if len(repr(value)) <= 24 else "a number"
    if isinstance(value, str):
        shown = _printable(value if len(value) <= 40 else value[:37] + "...")
        return f"the text {shown!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


_MISSING = object()


def _value_at(where: _Located, doc: _Document) -> Any:
    """The YAML value an error is about (``_MISSING`` when it is not in the file)."""
    if not where.path:
        return doc.data
    container, seg = where.parent_data, where.path[-1]
    if where.key_error:
        return seg
    if isinstance(container, dict) and _hashable(seg) and seg in container:
        return container[seg]
    if isinstance(container, list) and isinstance(seg, int) and 0 <= seg < len(container):
        return container[seg]
    return _MISSING


def _expected(etype: str, msg: str) -> str | None:
    """What a type error expected, as "a ..." (None if it is not a type error)."""
    model = re.search(r"instance of (\w+)", msg)
    if etype in ("model_type", "model_attributes_type", "dict_type"):
        if model and model.group(1) == "SecretRef":
            return "a secret reference, " + SECRET_HOWTO
        return "a mapping (`key: value` lines indented under it)"
    return {
        "string_type": "text",
        "int_type": "a whole number", "int_parsing": "a whole number",
        "int_from_float": "a whole number",
        "float_type": "a number", "float_parsing": "a number",
        "bool_type": "true or false", "bool_parsing": "true or false",
        "list_type": "a list (`- item` lines, or [a, b])",
        "set_type": "a list (`- item` lines, or [a, b])",
        "tuple_type": "a list (`- item` lines, or [a, b])",
        "ip_v4_network": _NETWORK, "ip_v6_network": _NETWORK, "ip_any_network": _NETWORK,
        "ip_v4_address": "an IP address", "ip_v6_address": "an IP address",
        "ip_any_address": "an IP address",
    }.get(etype)


def _readable(etype: str, msg: str, ctx: dict[str, Any], where: _Located,
              doc: _Document) -> str:
    """A message a person understands, in place of Pydantic's default one."""
    value = _value_at(where, doc)
    got = "" if value is _MISSING else f", not {_kind(value)}"
    expected = _expected(etype, msg)
    if expected is not None:
        if (expected.startswith("a secret reference") and where.union_at is None
                and isinstance(value, str | int | float) and not isinstance(value, bool)):
            return PLAINTEXT_SECRET
        return f"expected {expected}{got}"
    if etype == "literal_error":
        choices = re.findall(r"'((?:[^'\\]|\\.)*)'", str(ctx.get("expected", "")))
        text = f"must be one of {', '.join(repr(c) for c in choices)}{got}"
        close = _suggest(value, choices) if isinstance(value, str) else None
        return text + (f" (did you mean {close!r}?)" if close else "")
    if etype == "string_pattern_mismatch":
        help_ = _PATTERN_HELP.get(str(ctx.get("pattern")))
        return f"expected {help_}{got}" if help_ else f"does not have the expected form{got}"
    if etype == "too_short":
        n = ctx.get("min_length")
        return f"needs at least {n} item{'s' if n != 1 else ''}, got {ctx.get('actual_length')}"
    if etype == "too_long":
        n = ctx.get("max_length")
        return f"holds at most {n} item{'s' if n != 1 else ''}, got {ctx.get('actual_length')}"
    if etype == "string_too_short":
        n = ctx.get("min_length")
        return f"must be at least {n} character{'s' if n != 1 else ''} long"
    if etype == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters long"
    bounds = {"greater_than_equal": ("at least", "ge"), "less_than_equal": ("at most", "le"),
              "greater_than": ("more than", "gt"), "less_than": ("less than", "lt")}
    if etype in bounds:
        words, key = bounds[etype]
        return f"must be {words} {ctx.get(key)}{got}"
    if etype == "finite_number":
        return f"expected a finite number{got}"
    if etype == "string_unicode":
        return ("holds a lone surrogate (an escape such as \\ud800 that is not a character): "
                "write the character itself")
    return msg


def _join(texts: list[str]) -> str:
    """One message for the members of a union that all failed at one value."""
    if len(texts) > 1 and all(t.startswith("expected ") for t in texts):
        tails = {t.rpartition(", not ")[2] for t in texts if ", not " in t}
        if len(tails) == 1 and all(", not " in t for t in texts):
            heads = [t.rpartition(", not ")[0].removeprefix("expected ") for t in texts]
            return f"expected {' or '.join(heads)}, not {tails.pop()}"
    return texts[0] + "".join(f", or {t[:1].lower()}{t[1:]}" for t in texts[1:])


def _validation_issues(exc: ValidationError, doc: _Document, filename: str) -> list[Issue]:
    errors: list[tuple[Loc, str, str, dict[str, Any]]] = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = tuple(err["loc"])
        ctx = err.get("ctx") or {}
        if err["type"] == "assertions" and isinstance(ctx.get("problems"), list):
            for problem_loc, problem_msg in ctx["problems"]:
                errors.append(((*loc, *problem_loc), "assertion", str(problem_msg), {}))
        elif isinstance(ctx.get("found"), list):
            # Several problems found inside the field's value, each at its own place.
            for at, message in ctx["found"]:
                errors.append(((*loc, *at), err["type"], str(message), {}))
        elif isinstance(ctx.get("at"), list):
            # An error found inside the field's value (a list item, a dict key or value).
            errors.append(((*loc, *ctx["at"]), err["type"], err["msg"], ctx))
        else:
            errors.append((loc, err["type"], err["msg"], ctx))

    located: list[tuple[_Located, str, str]] = []
    for loc, etype, msg, ctx in errors:
        where = _locate(loc, etype, doc)
        if any(where.path[:len(p)] == p for p in doc.poisoned):
            continue
        text = _readable(etype, msg, ctx, where, doc)
        located.append((where, etype, _message(etype, text, where)))

    issues: list[Issue] = []
    i = 0
    while i < len(located):
        # Pydantic reports every member of a union that failed for a value. Keep the members
        # whose type matched the value when there are some, and one line per position.
        group = [located[i]]
        i += 1
        union_at = group[0][0].union_at
        while union_at is not None and i < len(located) and located[i][0].union_at == union_at:
            group.append(located[i])
            i += 1
        if union_at is not None:
            shaped = [g for g in group
                      if not (g[1].endswith("_type") and g[0].path == union_at)]
            group = shaped or group
        merged: dict[tuple[Loc, Mark], list[str]] = {}
        for where, _etype, text in group:
            texts = merged.setdefault((where.path, where.mark), [])
            if text not in texts:
                texts.append(text)
        for (path, mark), texts in merged.items():
            issues.append(Issue(filename, mark[0], mark[1], _fmt_loc(path), _join(texts)))
    return issues


def _sorted(issues: Iterable[Issue]) -> list[Issue]:
    out: list[Issue] = []
    for issue in sorted(issues, key=lambda i: (i.line, i.col)):
        if issue not in out:
            out.append(issue)
    return out
