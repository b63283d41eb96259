"""The OpenAPI document covers every route; errors, limits and unknown paths answer in the seed's shape."""

from __future__ import annotations

import re

import pytest

from admin_api import all_routes


async def test_every_registered_route_is_documented(client):
    doc = await (await client.get("/v1/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    registered = set()
    subapps = [
        r.get_info()["app"] for r in client.app.router.resources() if r.get_info().get("prefix") == "/v1"
    ]
    assert len(subapps) == 1
    for resource in subapps[0].router.resources():
        canonical = resource.canonical
        if not canonical.startswith("/v1/") or canonical.endswith("{tail}"):
            continue
        for route in resource:
            registered.add((route.method, canonical))
    assert registered, "no /v1 routes found"
    assert registered == documented
    assert len(documented) == len(all_routes())
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            params = {p["name"] for p in op["parameters"] if p["in"] == "path"}
            assert params == set(re.findall(r"{(\w+)}", path)), (method, path)
            assert op["summary"] and op["operationId"] and op["responses"]


async def test_docs_page_renders_the_document_without_a_cdn(client):
    resp = await client.get("/v1/docs")
    html = await resp.text()
    assert resp.status == 200 and resp.content_type == "text/html"
    assert 'fetch("openapi.json")' in html and "https://" not in html


async def test_unknown_path_and_method_answer_in_the_error_shape(client):
    resp = await client.get("/v1/no-such-thing")
    body = await resp.json()
    assert resp.status == 404 and body["message"] == "Cannot GET /v1/no-such-thing"
    assert set(body) == {"statusCode", "message", "error", "code", "timestamp", "path"}
    assert body["code"] == "NOT_FOUND"
    resp = await client.put("/v1/payments")
    body = await resp.json()
    assert resp.status == 405 and body["statusCode"] == 405 and body["code"] == "METHOD_NOT_ALLOWED"


async def test_body_too_large_is_413(admin, demo):
    resp = await admin.req(
        "POST",
        "/v1/payments",
        data=b"{" + b" " * (70 * 1024) + b"}",
        headers={"Content-Type": "application/json"},
    )
    body = await resp.json()
    assert resp.status == 413 and body["error"] == "Request Entity Too Large"


async def test_wrong_content_type_and_non_object_body(admin):
    resp = await admin.req("POST", "/v1/api-keys", data=b"name=x", headers={"Content-Type": "text/plain"})
    assert resp.status == 415
    resp = await admin.req("POST", "/v1/api-keys", json=["not", "an", "object"])
    assert resp.status == 400 and (await resp.json())["message"] == ["body must be an object"]


async def test_body_refused_where_none_is_taken(admin, demo):
    member = demo["members"]["+250788000001"]
    resp = await admin.req("POST", f"/v1/members/{member}/approve", json={"force": True})
    assert resp.status == 400


@pytest.mark.usefixtures("limiter_clock")
async def test_read_rate_limit_headers_and_429(admin, rt):
    from core.ratelimit import Limit, RateLimiter

    resp = await admin.req("GET", "/v1/payments")
    assert resp.headers["X-RateLimit-Limit"] == "100" and resp.headers["X-RateLimit-Remaining"] == "99"
    # Use up the bucket directly, as many processes would, then the next call is refused.
    limiter = RateLimiter(rt.redis)
    subject = None
    async for key in rt.redis.scan_iter(match="rl:{*}:payments:list:*"):
        subject = key.decode().split("{", 1)[1].split("}", 1)[0]
    assert subject
    for _ in range(99):
        await limiter.hit(Limit("payments:list", 100), subject)
    resp = await admin.req("GET", "/v1/payments")
    assert resp.status == 429 and resp.headers["X-RateLimit-Remaining"] == "0"
    assert (await resp.json())["code"] == "RATE_LIMITED"


async def test_every_schema_in_the_document_is_valid_json_schema(client):
    from jsonschema import Draft202012Validator

    doc = await (await client.get("/v1/openapi.json")).json()
    count = 0
    for ops in doc["paths"].values():
        for op in ops.values():
            bodies = [c["schema"] for c in op.get("requestBody", {}).get("content", {}).values()]
            bodies += [c["schema"] for r in op["responses"].values() for c in r.get("content", {}).values()]
            bodies += [p["schema"] for p in op["parameters"]]
            for schema in bodies:
                if "$ref" not in schema:
                    Draft202012Validator.check_schema(schema)
                    count += 1
    Draft202012Validator.check_schema(doc["components"]["schemas"]["Error"])
    assert count > 100


def test_every_503_documents_its_retry_after():
    """Every 503 of the API carries Retry-After (admin_api.errors: an outage, or Redis unavailable to end sessions):
    the document says so wherever it lists a 503, as it does for the 429's."""
    from admin_api import all_routes
    from admin_api.openapi import build_document

    doc = build_document(all_routes())
    unavailable = [op["responses"]["503"] for item in doc["paths"].values() for op in item.values()
                   if "503" in op["responses"]]
    assert unavailable
    for response in unavailable:
        assert response["headers"]["Retry-After"]["schema"] == {"type": "integer", "minimum": 1}
