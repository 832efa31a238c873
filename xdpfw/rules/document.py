"""A list of rules as a file holds it: what `xdpfw rules export` writes and `rules import`
and `PUT /api/v1/rules` read, in text or JSON. Rules that share a kind (action, protocol,
port, comment, set) share a section, and a section's prefixes are a plain blocklist, read
by the vectorised parser: a million rules go in and out as columns.

Text: lines before any header are a plain blocklist (its kind comes from the request);
each header line `@rules {...}` (a JSON object: action, proto, dport, comment, set) starts a
section; `#` starts a comment.

    # xdpfw rules export: 3 rules
    @rules {"action": "drop", "set": "feed", "comment": "drop list"}
    192.0.2.0/24
    198.51.100.7
    @rules {"action": "pass", "proto": "tcp", "dport": 22}
    10.0.0.0/8

JSON: {"format": "xdpfw-rules", "version": 1, "sections": [{...kind, "prefixes": [...]}]}.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from xdpfw.errors import RuleValidationError
from xdpfw.rules.blocklist import parse_blocklist_bytes
from xdpfw.rules.kind import RuleKind
from xdpfw.rules.model import V4, V6, Action, parse_prefix
from xdpfw.rules.table import (
    ACTION_CODE,
    ACTION_OF,
    PROTO_CODE,
    PROTO_OF,
    NewRules,
    Prefixes,
    RuleTable,
)

HEADER = b"@rules "
FORMAT = "xdpfw-rules"
LINES_PER_CHUNK = 65_536  # lines of an export formatted at a time
MAX_SECTIONS = 65_536  # a section costs a parser call: a body of tiny ones is refused


@dataclass
class Section:
    prefixes: Prefixes
    kind: RuleKind
    positions: np.ndarray | None = None  # where its rules were in a request's list


@dataclass
class RuleDocument:
    sections: list[Section]

    def __len__(self) -> int:
        return sum(len(s.prefixes) for s in self.sections)

    def check_set(self, name: str) -> None:
        """A document that replaces set `name` names no other set."""
        for s in self.sections:
            if s.kind.set not in ("", name):
                raise RuleValidationError(
                    f"these rules name set {s.kind.set!r}: a body for set {name!r} may name "
                    "that set or none")

    def new_rules(self, table: RuleTable, rule_set: str | None = None) -> NewRules:
        """As columns, comments and sets numbered by `table`; rule_set: every rule's set."""
        parts = []
        for s in self.sections:
            k = s.kind
            n = len(s.prefixes)
            if not n:
                continue

            def same(value, dtype, n=n) -> np.ndarray:  # no memory per rule
                return np.broadcast_to(np.array(value, dtype=dtype), (n,))

            parts.append(NewRules(
                s.prefixes, same(PROTO_CODE[k.proto], np.uint8), same(k.dport or 0, np.uint16),
                same(ACTION_CODE[k.action], np.uint8), same(table.comment_id(k.comment),
                                                            np.uint32),
                same(table.set_id(k.set if rule_set is None else rule_set), np.uint16)))
        if not parts:
            return NewRules.plain(Prefixes.empty(), Action.DROP, 0)
        new = NewRules.concat(parts)
        if all(s.positions is not None for s in self.sections):  # back to the list's order
            where = np.concatenate([s.positions for s in self.sections if len(s.prefixes)])
            new = new.take(np.argsort(where, kind="stable"))
        return new


# -- reading ------------------------------------------------------------------------------


def parse_text(data: bytes | bytearray, default: RuleKind) -> RuleDocument:
    """A text document (a plain blocklist is one: every line of kind `default`). A bad line
    raises, naming its line number in the whole text."""
    starts = _header_starts(data)
    if not starts:
        return RuleDocument([Section(parse_blocklist_bytes(data), default)])
    if len(starts) > MAX_SECTIONS:
        raise RuleValidationError(f"{len(starts)} sections: at most {MAX_SECTIONS}")
    sections = []
    if starts[0] > 0:  # lines before the first header: a blocklist of the default kind
        before = parse_blocklist_bytes(data[:starts[0]])
        if len(before):
            sections.append(Section(before, default))
    line, counted = 1, 0  # the line number of offset `counted`
    for i, at in enumerate(starts):
        eol = data.find(b"\n", at)
        eol = len(data) if eol < 0 else eol
        line += data.count(b"\n", counted, at)
        counted = at
        kind = _header(bytes(data[at + len(HEADER):eol]), line)
        end = starts[i + 1] if i + 1 < len(starts) else len(data)
        body = data[eol + 1:end] if eol < end else b""
        sections.append(Section(parse_blocklist_bytes(body, first_line=line + 1), kind))
    return RuleDocument(sections)


def _header_starts(data: bytes | bytearray) -> list[int]:
    """Offsets of the lines that begin with '@' (headers, or mistakes to name)."""
    out = [0] if data.startswith(b"@") else []
    at = data.find(b"\n@")
    while at >= 0 and len(out) <= MAX_SECTIONS:
        out.append(at + 1)
        at = data.find(b"\n@", at + 1)
    return out


def _header(text: bytes, line: int) -> RuleKind:
    if not text.startswith(b"{"):
        raise RuleValidationError(
            f"line {line}: a line starting with '@' must be a section header, "
            '@rules {"action": ..., "proto": ..., "dport": ..., "comment": ..., "set": ...}')
    try:
        return RuleKind.model_validate_json(text)
    except ValidationError as e:
        raise RuleValidationError(f"line {line}: {first_error(e)}") from None


class JsonSection(RuleKind):
    prefixes: list[str] = Field(default_factory=list)


class JsonDocument(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["xdpfw-rules"]
    version: Literal[1]
    sections: list[JsonSection]


def parse_json(data: bytes | bytearray) -> RuleDocument:
    try:
        doc = JsonDocument.model_validate_json(data)
    except ValidationError as e:
        raise RuleValidationError(first_error(e)) from None
    return from_json(doc)


def from_json(doc: JsonDocument) -> RuleDocument:
    return RuleDocument([
        Section(prefixes_of(s.prefixes, f"sections[{i}].prefixes item"),
                RuleKind.model_validate(s.model_dump(exclude={"prefixes"})))
        for i, s in enumerate(doc.sections)])


def prefixes_of(items: list[str], source: str) -> Prefixes:
    """JSON strings through the vectorised parser when each is one plain line; otherwise
    one by one, so the message names the bad item."""
    text = "\n".join(items)
    if text.count("\n") == max(len(items) - 1, 0) and "#" not in text:
        try:
            out = parse_blocklist_bytes(text.encode())
        except RuleValidationError:
            out = None
        if out is not None and len(out) == len(items):
            return out
    out = []
    for i, item in enumerate(items, 1):  # each item one prefix: blank ones are mistakes too
        try:
            out.append(parse_prefix(item))
        except RuleValidationError as e:
            raise RuleValidationError(f"{source} {i}: {e}") from None
    return Prefixes.of(out)


def parse_document(data: bytes | bytearray, content_type: str, default: RuleKind
                   ) -> RuleDocument:
    """A request body: text/plain (a document or a blocklist) or application/json."""
    if content_type == "text/plain":
        return parse_text(data, default)
    return parse_json(data)


def first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


# -- writing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Export:
    """A copy of every rule for writing out without the firewall's lock: the sections'
    kinds, and their prefixes one after the other (section i is rows bounds[i]:bounds[i+1])."""

    kinds: list[RuleKind]
    bounds: list[int]
    prefixes: Prefixes

    def __len__(self) -> int:
        return len(self.prefixes)

    def section(self, i: int) -> Prefixes:
        return self.prefixes.take(slice(self.bounds[i], self.bounds[i + 1]))


def export(table: RuleTable) -> Export:
    """Every living rule, grouped by kind, the kinds in a stable order (set, comment,
    action, protocol, port) and each section's prefixes in address order, so the same rules
    always export to the same bytes."""
    rows = table.rows()
    c = table.col
    cols = [c[k][rows].astype(np.int64) for k in ("set", "comment", "action", "proto", "dport")]
    if len(rows):
        kinds, which = np.unique(np.stack(cols, axis=1), axis=0, return_inverse=True)
        which = which.ravel()
    else:
        kinds, which = np.zeros((0, 5), np.int64), np.zeros(0, np.int64)
    found = []
    for i, (sid, cid, act, proto, dport) in enumerate(kinds.tolist()):
        kind = RuleKind.model_construct(
            action=ACTION_OF[act], proto=PROTO_OF[proto], dport=dport or None,
            comment=table.comments[cid], set=table.sets[sid])
        found.append((kind, i))
    found.sort(key=lambda ki: (ki[0].set, ki[0].comment, ki[0].action.value,
                               ki[0].proto.value if ki[0].proto else "", ki[0].dport or 0))
    # Rows by section (in the sorted order), then by address within each.
    rank = np.empty(len(found), dtype=np.int64)
    rank[[i for _, i in found]] = np.arange(len(found))
    sec = rank[which]
    order = np.lexsort((c["plen"][rows], c["lo"][rows], c["hi"][rows], c["family"][rows], sec))
    mine = rows[order]
    bounds = np.searchsorted(sec[order], np.arange(len(found) + 1)).tolist()
    return Export([k for k, _ in found], bounds,
                  Prefixes(c["family"][mine], c["hi"][mine], c["lo"][mine], c["plen"][mine]))


def kind_json(kind: RuleKind) -> dict:
    """The kind as a header says it: defaults left out."""
    out: dict = {"action": kind.action.value}
    if kind.proto is not None:
        out["proto"] = kind.proto.value
    if kind.dport:
        out["dport"] = kind.dport
    if kind.comment:
        out["comment"] = kind.comment
    if kind.set:
        out["set"] = kind.set
    return out


def prefix_lines(p: Prefixes) -> Iterator[list[str]]:
    """Prefixes as text, a chunk of lines at a time (hosts as bare addresses)."""
    for lo in range(0, len(p), LINES_PER_CHUNK):
        part = p.take(slice(lo, lo + LINES_PER_CHUNK))
        if (part.family == V4).all():
            yield _v4_text(part.lo.astype(np.uint32), part.plen)
        else:
            yield [_host_bare(part, i) for i in range(len(part))]


def _host_bare(p: Prefixes, i: int) -> str:
    text = str(p.prefix(i))
    host = 128 if p.family[i] == V6 else 32
    return text.removesuffix(f"/{host}")


def _v4_text(nets: np.ndarray, plens: np.ndarray) -> list[str]:
    octets = [((nets >> np.uint32(s)) & np.uint32(255)).tolist() for s in (24, 16, 8, 0)]
    return [f"{a}.{b}.{c}.{d}" if p == 32 else f"{a}.{b}.{c}.{d}/{p}"
            for a, b, c, d, p in zip(*octets, plens.tolist(), strict=True)]


def write_text(ex: Export) -> Iterator[bytes]:
    yield f"# xdpfw rules export: {len(ex)} rules\n".encode()
    for i, kind in enumerate(ex.kinds):
        yield HEADER + json.dumps(kind_json(kind)).encode() + b"\n"
        for lines in prefix_lines(ex.section(i)):
            yield ("\n".join(lines) + "\n").encode()


def document_text(doc: RuleDocument) -> bytes:
    """A RuleDocument in the text format (what `check-config --diff` sends)."""
    out = [f"# {len(doc)} rules\n".encode()]
    for s in doc.sections:
        out.append(HEADER + json.dumps(kind_json(s.kind)).encode() + b"\n")
        out += [("\n".join(lines) + "\n").encode() for lines in prefix_lines(s.prefixes)]
    return b"".join(out)


def write_json(ex: Export) -> Iterator[bytes]:
    yield f'{{"format": "{FORMAT}", "version": 1, "sections": ['.encode()
    for i, kind in enumerate(ex.kinds):
        head = json.dumps(kind_json(kind))[:-1]  # the object, still open
        yield f'{"," if i else ""}\n{head}, "prefixes": ['.encode()
        first = True
        for lines in prefix_lines(ex.section(i)):
            yield (("" if first else ",") + ",".join(f'"{x}"' for x in lines)).encode()
            first = False
        yield b"]}"
    yield b"\n]}\n"
