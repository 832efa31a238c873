"""The rules a config file declares ([[rules]] and [[sets]]), as one RuleDocument: what
start-up and `xdpfw reload` make the store equal to when [state] rules_from_config is on,
and what `xdpfw check-config --diff` compares the running rules with.

A set's file is read here, by whoever reads the config (the daemon, as root; the CLI, with
the caller's permissions): the API itself never takes a path.
"""

from __future__ import annotations

from pathlib import Path

from xdpfw.config import AppConfig, ConfigError, line_of
from xdpfw.errors import RuleValidationError
from xdpfw.rules.document import RuleDocument, Section, parse_text, prefixes_of
from xdpfw.rules.kind import RuleKind
from xdpfw.rules.model import parse_prefix
from xdpfw.rules.table import Prefixes


def declared_rules(cfg: AppConfig, path: str | Path) -> RuleDocument:
    """Every rule of the config at `path` (already loaded as `cfg`); a bad prefix or file is
    a ConfigError naming the file and line."""
    path = Path(path)
    text = path.read_text()
    by_kind: dict[str, tuple[RuleKind, list[str]]] = {}
    for r in cfg.rules:
        kind = RuleKind.model_validate(r.model_dump(exclude={"prefix"}))
        by_kind.setdefault(kind.model_dump_json(), (kind, []))[1].append(r.prefix)
    sections = [Section(Prefixes.of([parse_prefix(p) for p in prefixes]), kind)
                for kind, prefixes in by_kind.values()]
    for n, s in enumerate(cfg.sets):
        where = f"{path}:{line_of(text, ('sets', n, 'name')) or '?'}"
        kind = RuleKind.model_validate(s.model_dump(
            exclude={"name", "prefixes", "file"}) | {"set": s.name})
        try:
            if s.prefixes:
                sections.append(Section(prefixes_of(s.prefixes, "prefixes item"), kind))
            if s.file is not None:
                sections += _file_sections(path.parent / s.file, kind)
        except RuleValidationError as e:
            raise ConfigError(f"{where}: sets[{n}] ({s.name}): {e}") from None
        except OSError as e:
            raise ConfigError(f"{where}: sets[{n}] ({s.name}): {e.strerror}: {e.filename}"
                              ) from None
    return RuleDocument(sections)


def _file_sections(file: Path, kind: RuleKind) -> list[Section]:
    try:
        doc = parse_text(file.read_bytes(), kind)
        doc.check_set(kind.set)
    except RuleValidationError as e:
        raise RuleValidationError(f"{file}: {e}") from None
    return [Section(s.prefixes, s.kind.model_copy(update={"set": kind.set}))
            for s in doc.sections]
