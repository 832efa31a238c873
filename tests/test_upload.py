"""Program sources over the API: the text is checked as the preprocessor reads it, and the
API never takes a path (tests/test_upload.py; the real daemon in netns_tests/test_hardening.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from xdpfw.api.upload import check_source, staged
from xdpfw.dataplane.loader import BPF_DIR
from xdpfw.errors import SourceRefusedError

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = [*BPF_DIR.glob("*.c"), *BPF_DIR.glob("*.h"), *(ROOT / "tests" / "data").glob("*.c"),
           *(ROOT / "scripts" / "bench_progs").glob("*.c")]

READS_A_FILE = {
    "absolute": '#include "/etc/passwd"\n',
    "dot-dot": '#include "../../../etc/passwd"\n',
    "not ours": '#include "secrets.h"\n',
    "angle absolute": "#include </etc/passwd>\n",
    "angle dot-dot": "#include <linux/../../../../etc/passwd>\n",
    "spaces": '  #   include   "/etc/passwd"\n',
    "digraph": '%:include "/etc/passwd"\n',
    "line splice": '#inc\\\nlude "/etc/passwd"\n',
    "splice after spaces": '#inc\\  \nlude "/etc/passwd"\n',
    "comment inside": '#/* x */include "/etc/passwd"\n',
    "comment hiding a newline": '# /*\n*/ include "/etc/passwd"\n',
    "through a macro": '#define F "/etc/passwd"\n#include F\n',
    "include_next": "#include_next <passwd>\n",
    "import": '#import "/etc/passwd"\n',
    "embed": 'char x[] = {\n#embed "/etc/passwd"\n};\n',
    "__has_include": '#if __has_include("/etc/shadow")\n#endif\n',
    "_Pragma": '_Pragma("clang __debug crash")\n',
    "token pasting": "#define P(a, b) a##b\n",
    "pasting digraph": "#define P(a, b) a%:%:b\n",
    "pragma __debug": "#pragma clang __debug crash\n",
    "pragma dependency": '#pragma GCC dependency "/etc/shadow"\n',
    ".incbin": 'asm(".incbin \\"/etc/passwd\\"");\n',
    ".include": 'asm(".include \\"/etc/passwd\\"");\n',
    "trigraph": '??=include "/etc/passwd"\n',
    "NUL": "int x;\0",
}


@pytest.mark.parametrize("text", READS_A_FILE.values(), ids=READS_A_FILE.keys())
def test_what_could_read_a_file_is_refused(text):
    with pytest.raises(SourceRefusedError):
        check_source(text)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_source_we_ship_passes(path):
    check_source(path.read_text())


@pytest.mark.parametrize("text", [
    '// #include "/etc/passwd"\n',
    '/* #include "/etc/passwd" */\n',
    'char *s = "#include \\"/etc/passwd\\"";\n',
    "#include <linux/bpf.h> // a comment\n",
    '#include "maps.h" /* a comment */\n',
    "#pragma unroll\n#pragma clang loop unroll(full)\n",
    '#\n# 1 "x.c"\n',
])
def test_what_only_looks_like_it_passes(text):
    check_source(text)


def test_the_refusal_names_the_line():
    with pytest.raises(SourceRefusedError, match=r"^line 4: #include "):
        check_source('int a;\n/* two\nlines */\n#include "/etc/passwd"\n')


def test_staged_sources_sit_next_to_links_to_our_headers_only():
    with staged("int x;\n", "mine.c") as path:
        assert path.read_text() == "int x;\n"
        links = {p.name: p.resolve() for p in path.parent.iterdir() if p != path}
        assert links == {h.name: h.resolve() for h in BPF_DIR.glob("*.h")}
    assert not path.parent.exists()
    with pytest.raises(SourceRefusedError, match="plain file name"), staged("", "../x.c"):
        pass


# -- the route (a real Firewall; TestClient looks like a TCP client: no peer credentials) ----


@pytest.mark.bpf
def test_reload_takes_no_path_and_reads_nothing(fw, tmp_path, monkeypatch):
    from xdpfw.api.app import create_app

    secret = tmp_path / "secret.c"
    text = "int leaked_canary_4d3f;\n"
    secret.write_text(text)
    calls = []
    monkeypatch.setattr(fw, "upgrade", lambda *a: calls.append(a))
    opened = []
    real_open = Path.open
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: (
        opened.append(self), real_open(self, *a, **k))[1])
    with TestClient(create_app(fw)) as c:
        r = c.post("/api/v1/program/reload", json={"source": str(secret)})
        assert r.status_code == 422, r.text
        assert "reads no file" in r.text and "canary" not in r.text, r.text
        r = c.post("/api/v1/program/reload", json={"source_text": text})
        assert r.status_code == 403 and "root on the unix socket" in r.text, r.text
    with TestClient(create_app(fw, token="t")) as c:
        r = c.post("/api/v1/program/reload", headers={"authorization": "Bearer t"},
                   json={"source_text": "int x;\n"})
        assert r.status_code == 403, r.text
    assert calls == [], "a refused reload reached the loader"
    assert secret not in opened
