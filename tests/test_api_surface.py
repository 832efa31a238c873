"""What the API shows a client besides its answers: one error shape, an OpenAPI document that
lists every error and the bearer scheme, Location on 201, the bulk body chosen by its keys,
and /docs with no CDN."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from xdpfw import netns as nsutil
from xdpfw.api.app import create_app
from xdpfw.api.middleware import BodyLimits

pytestmark = pytest.mark.bpf

TOKEN = "s3cret"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(fw):
    with TestClient(create_app(fw, token=TOKEN, body_limits=BodyLimits(4096, 8192)),
                    headers=AUTH) as c:
        yield c


# (method, path as in OpenAPI, URL, request kwargs, status): one request per error an
# operator can meet.
ERRORS = [
    ("post", "/api/v1/rules", "/api/v1/rules", {"json": {"prefix": "10.0.0.1/8", "x": 1}}, 422),
    ("post", "/api/v1/rules", "/api/v1/rules", {"json": {"prefix": "192.0.2.0/24"}}, 409),
    ("post", "/api/v1/rules", "/api/v1/rules", {"content": b"x" * 5000,
                                                "headers": {"content-type": "application/json"}},
     413),
    ("post", "/api/v1/rules", "/api/v1/rules", {"content": b"{", "headers": {
        "content-type": "application/json"}}, 422),
    ("get", "/api/v1/rules", "/api/v1/rules?limit=0", {}, 422),
    ("get", "/api/v1/rules/{rule_id}", "/api/v1/rules/999999", {}, 404),
    ("get", "/api/v1/rules/{rule_id}", "/api/v1/rules/abc", {}, 422),
    ("delete", "/api/v1/rules/{rule_id}", "/api/v1/rules/999999", {}, 404),
    ("post", "/api/v1/rules/bulk", "/api/v1/rules/bulk", {"json": [1]}, 422),
    ("post", "/api/v1/rules/bulk", "/api/v1/rules/bulk", {"content": b"1.2.3.4",
                                                          "headers": {"content-type": "text/csv"}},
     415),
    ("post", "/api/v1/rules/bulk", "/api/v1/rules/bulk", {"json": {"prefixes": ["192.0.2.0/24"]}},
     409),
    ("post", "/api/v1/interfaces", "/api/v1/interfaces", {"json": {"name": "nosuchif0"}}, 404),
    ("get", "/api/v1/interfaces/{name}", "/api/v1/interfaces/nosuchif0", {}, 404),
    ("delete", "/api/v1/interfaces/{name}", "/api/v1/interfaces/nosuchif0", {}, 404),
    ("get", "/api/v1/services", "/api/v1/services", {}, 404),  # no load balancer here
    ("put", "/api/v1/events/config", "/api/v1/events/config", {"json": {"sample_rate": -1}},
     422),
    ("get", "/api/v1/events/config", "/api/v1/events/config", {}, 503),  # no event reader
    ("post", "/api/v1/program/reload", "/api/v1/program/reload",
     {"json": {"source_text": "int x;"}}, 403),  # not root on the unix socket
    ("post", "/api/v1/shutdown", "/api/v1/shutdown", {}, 503),
    ("get", "/api/v1/rules", "/api/v1/rules", {"headers": {"authorization": "Bearer no"}}, 401),
]


def _provoke(client, fw, method, url, kw):
    if not len(fw.table):
        assert client.post("/api/v1/rules", json={"prefix": "192.0.2.0/24"}).status_code == 201
    return client.request(method.upper(), url, **kw)


@pytest.mark.parametrize(("method", "path", "url", "kw", "status"), ERRORS,
                         ids=[f"{e[0]} {e[2]} {e[4]}" for e in ERRORS])
def test_every_error_has_one_shape_and_is_documented(client, fw, method, path, url, kw, status):
    r = _provoke(client, fw, method, url, kw)
    assert r.status_code == status, r.text
    body = r.json()
    assert isinstance(body.get("detail"), str) and body["detail"], body
    assert set(body) <= {"detail", "errors"}, body
    if "errors" in body:  # validation: one entry per field, and never the input echoed back
        assert status == 422 and body["errors"], body
        assert all(set(e) == {"loc", "msg", "type"} for e in body["errors"]), body
    op = client.get("/openapi.json").json()["paths"][path][method]
    documented = op["responses"].get(str(status))
    assert documented, f"{method} {path}: {status} is answered but not documented: " \
                       f"{sorted(op['responses'])}"
    schema = documented["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (status, schema)


def test_validation_detail_names_the_field_and_lists_all(client):
    r = client.post("/api/v1/rules", json={"prefix": "10.0.0.1/8", "colour": "red"})
    assert r.status_code == 422
    body = r.json()
    assert body["detail"].startswith("prefix: '10.0.0.1/8' has host bits set"), body
    assert body["detail"].endswith(" (and 1 more: see errors)"), body
    assert [e["loc"] for e in body["errors"]] == [["body", "prefix"], ["body", "colour"]], body
    r = client.get("/api/v1/rules", params={"limit": 0})
    assert r.json()["detail"].startswith("query.limit: Input should be greater than"), r.text


def test_openapi_documents_errors_everywhere_and_the_bearer_scheme(client):
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer", spec
    assert {"bearer": []} in spec["security"], spec["security"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    for path, item in spec["paths"].items():
        for method, op in item.items():
            codes = set(op["responses"])
            assert {"401", "500"} <= codes, (method, path, codes)
            if op.get("requestBody"):
                assert {"413", "422"} <= codes, (method, path, codes)
            for code, resp in op["responses"].items():
                if int(code) >= 400:
                    schema = resp["content"]["application/json"]["schema"]
                    assert schema["$ref"].endswith("/ErrorBody"), (method, path, code)
    for path, method in (("/api/v1/rules/bulk", "post"), ("/api/v1/rules", "put"),
                         ("/api/v1/sets/{name}", "put")):
        body = spec["paths"][path][method]["requestBody"]["content"]
        refs = [s["$ref"] for s in body["application/json"]["schema"]["oneOf"]]
        assert refs == ["#/components/schemas/BulkPrefixes", "#/components/schemas/BulkRules",
                        "#/components/schemas/JsonDocument"], (path, refs)
        assert "text/plain" in body, path
        for ref in refs:
            assert ref.rsplit("/", 1)[1] in spec["components"]["schemas"], ref
    created = spec["paths"]["/api/v1/rules"]["post"]["responses"]["201"]
    assert "Location" in created["headers"], created


def test_201_has_a_location_that_answers(client, fw, make_netns):
    r = client.post("/api/v1/rules", json={"prefix": "198.51.100.0/24"})
    assert r.status_code == 201 and r.headers["location"] == f"/api/v1/rules/{r.json()['id']}"
    assert client.get(r.headers["location"]).json() == r.json()

    ns, peer = make_netns("loc"), make_netns("lcp")
    nsutil.veth_pair(ns, "loc0", peer, "lcp0")
    r = client.post("/api/v1/interfaces", json={"name": "loc0", "netns": ns, "mode": "generic"})
    try:
        assert r.status_code == 201, r.text
        assert r.headers["location"] == f"/api/v1/interfaces/loc0?netns={ns}", r.headers
        got = client.get(r.headers["location"])
        assert got.status_code == 200 and got.json()["slot"] == r.json()["slot"], got.text
        again = client.post("/api/v1/interfaces", json={"name": "loc0", "netns": ns})
        assert again.status_code == 200 and "location" not in again.headers, again.headers
    finally:
        fw.detach_interface("loc0", ns)


def test_bulk_body_form_is_chosen_by_its_keys_not_its_first_bytes(client, fw):
    # "rules" past the 64th byte (a client that indents), and "rules" as a comment.
    body = b" " * 80 + b'{"rules": [{"prefix": "198.51.100.0/24", "proto": "udp", "dport": 53}]}'
    r = client.post("/api/v1/rules/bulk", content=body,
                    headers={"content-type": "application/json"})
    assert r.status_code == 201 and r.json()["added"] == 1, r.text
    r = client.post("/api/v1/rules/bulk", json={"comment": "rules", "prefixes": ["10.0.0.0/8"]})
    assert r.status_code == 201 and r.json()["added"] == 1, r.text
    assert sorted(r.comment for r in fw.list_rules()) == ["", "rules"]
    r = client.post("/api/v1/rules/bulk", json={"rules": [{"prefix": "11.0.0.0/8"}],
                                                "prefixes": ["12.0.0.0/8"]})
    assert r.status_code == 422 and r.json()["detail"] == "prefixes: Extra inputs are not " \
                                                          "permitted", r.text


def test_docs_need_no_cdn_and_no_token(fw):
    with TestClient(create_app(fw, token=TOKEN)) as anon:  # a browser: no token
        page = anon.get("/docs")
        assert page.status_code == 200, page.text
        html = page.text
        assert "http://" not in html and "https://" not in html, html
        urls = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert len(urls) >= 3, html
        for url in urls:
            r = anon.get(url)
            assert r.status_code == 200 and len(r.content) > 1000, (url, r.status_code)
        assert anon.get("/openapi.json").status_code == 200
        assert anon.get("/api/v1/rules").status_code == 401
        assert anon.get("/docs/../api/v1/rules").status_code == 401
        assert anon.get("/redoc").status_code in (401, 404)
