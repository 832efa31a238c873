"""Program source sent to `POST /api/v1/program/reload`: what the daemon will compile.

The API never takes a path: `xdpfw upgrade --source FILE` reads the file with the caller's
permissions and sends its text, and only root on the unix socket may send one. The daemon
compiles as root, so the text must not make the compiler read files for it either:

- `#include "x.h"` names one of the package's own headers (xdpfw/bpf/*.h), nothing else;
- `#include <x/y.h>` is a relative path without `..`, searched in the compiler's include
  directories (kernel and BCC headers) only;
- no other directive that reads a file (`#include_next`, `#import`, `#embed`, ...): only the
  directives listed in DIRECTIVES; no include through a macro; no `__has_include`,
  `_Pragma` (it builds pragmas out of strings), token pasting (`##`, which could build
  either) or trigraphs; `#pragma` only in the forms PRAGMAS lists (`#pragma clang __debug
  crash` would take the daemon down);
- no `.incbin` / `.include` assembler directive spelled out in the text.

This is the lexer's view of the text (comments, line splices and digraphs are read as the
compiler reads them), not a sandbox: a root user can write a program that does anything an
XDP program can. Sending one is a root act, which is why only root may.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from xdpfw.dataplane.loader import BPF_DIR
from xdpfw.errors import SourceRefusedError

DIRECTIVES = frozenset({
    "define", "undef", "if", "ifdef", "ifndef", "elif", "elifdef", "elifndef", "else", "endif",
    "error", "warning", "line", "pragma", "include",
})
PRAGMAS = re.compile(r"(once|unroll|nounroll|pack|push_macro|pop_macro)\b"
                     r"|(GCC|clang)\s+(diagnostic|loop|unroll)\b")
FORBIDDEN_WORDS = re.compile(r"\b(_Pragma|__pragma|__has_include|__has_include_next|"
                             r"__has_embed)\b|##|%:%:")
ASM_FILE_DIRECTIVES = re.compile(r"\.(incbin|include)\b", re.IGNORECASE)
TRIGRAPH = re.compile(r"\?\?[=/'()!<>\-]")
SPLICE = re.compile(r"\\[ \t\f\v]*\r?\n")  # clang also splices "\ " + newline
ANGLE_PATH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*(/[A-Za-z0-9_][A-Za-z0-9_.+-]*)*")
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\.c")


def package_headers() -> set[str]:
    return {p.name for p in BPF_DIR.glob("*.h")}


def check_source(text: str) -> None:
    """Raise SourceRefusedError naming the first line (of `text`) that reads outside the
    package's headers and the compiler's own include directories."""
    if "\0" in text:
        raise SourceRefusedError("the source holds a NUL character")
    if m := TRIGRAPH.search(text):
        raise SourceRefusedError(f"line {_line(text, m.start())}: trigraphs are not accepted")
    headers = package_headers()
    for line_no, line in _logical_lines(text):
        if m := FORBIDDEN_WORDS.search(line):
            raise SourceRefusedError(f"line {line_no}: {m.group(0)!r} is not accepted in an "
                                     "uploaded source (it can make the compiler read files)")
        if m := ASM_FILE_DIRECTIVES.search(line):
            raise SourceRefusedError(f"line {line_no}: the assembler directive "
                                     f"{m.group(0)!r} reads files; not accepted")
        _check_directive(line_no, line, headers)


def _check_directive(line_no: int, line: str, headers: set[str]) -> None:
    stripped = line.lstrip()
    if stripped.startswith("%:"):  # the digraph of '#'
        stripped = "#" + stripped[2:]
    if not stripped.startswith("#"):
        return
    m = re.match(r"#\s*([A-Za-z_]\w*|\d+)?(.*)", stripped, re.DOTALL)
    assert m is not None
    name, rest = m.group(1), m.group(2).strip()
    if name is None or name.isdigit():  # "#" alone, or a line marker ("# 12 "file"")
        return
    if name not in DIRECTIVES:
        raise SourceRefusedError(f"line {line_no}: #{name} is not accepted in an uploaded source")
    if name == "pragma" and not PRAGMAS.match(rest):
        raise SourceRefusedError(f"line {line_no}: #pragma {rest[:40]} is not accepted (only "
                                 "once, unroll, pack, push/pop_macro, GCC/clang diagnostic "
                                 "and loop)")
    if name == "include":
        _check_include(line_no, rest, headers)


def _check_include(line_no: int, target: str, headers: set[str]) -> None:
    where = f"line {line_no}: #include {target}"
    if m := re.fullmatch(r'"([^"]*)"', target):
        if m.group(1) not in headers:
            names = ", ".join(sorted(headers))
            raise SourceRefusedError(f'{where}: "..." may name only the package\'s headers '
                                     f"({names})")
        return
    if m := re.fullmatch(r"<([^>]*)>", target):
        path = m.group(1)
        if not ANGLE_PATH.fullmatch(path) or ".." in path.split("/"):
            raise SourceRefusedError(f"{where}: <...> must be a relative path without '..'")
        return
    raise SourceRefusedError(f'{where}: write the header literally, as "x.h" or <x/y.h>')


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first physical line, text) of each line as the preprocessor sees it: splices joined,
    each comment one space (a block comment may hide a newline inside a directive),
    string and character literals kept."""
    out: list[str] = []
    line, start, i, n = 1, 1, 0, len(text)
    while i < n:
        if text[i] == "\\" and (m := SPLICE.match(text, i)):
            line += 1
            i = m.end()
            continue
        two = text[i : i + 2]
        if two == "//":
            while i < n and text[i] != "\n":  # a splice continues the comment
                if text[i] == "\\" and (m := SPLICE.match(text, i)):
                    line += 1
                    i = m.end()
                else:
                    i += 1
            out.append(" ")
            continue
        if two == "/*":
            end = text.find("*/", i + 2)
            end = n if end < 0 else end + 2
            line += text.count("\n", i, end)
            out.append(" ")
            i = end
            continue
        c = text[i]
        if c in "\"'":
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                if text[j] == "\\" and (m := SPLICE.match(text, j)):
                    line += 1
                    j = m.end()
                    continue
                j += 2 if text[j] == "\\" else 1
            j = min(j + 1, n)
            out.append(SPLICE.sub("", text[i:j]))
            i = j
            continue
        if c == "\n":
            yield start, "".join(out)
            out, line = [], line + 1
            start = line
            i += 1
            continue
        out.append(c)
        i += 1
    yield start, "".join(out)


@contextlib.contextmanager
def staged(text: str, name: str = "upload.c") -> Iterator[Path]:
    """The checked text as a file in a private directory, next to links to the package's
    headers: the loader splices `#include "x.h"` from the file's own directory."""
    check_source(text)
    if not NAME.fullmatch(name):
        raise SourceRefusedError(f"source name {name!r}: use a plain file name ending in .c")
    with tempfile.TemporaryDirectory(prefix="xdpfw-upload-") as tmp:
        for header in package_headers():
            (Path(tmp) / header).symlink_to(BPF_DIR / header)
        path = Path(tmp) / name
        path.write_text(text)
        yield path
