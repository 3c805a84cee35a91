"""The admin API (SPEC §2): accounts, projects, keys, top-ups; bad input changes nothing."""

from __future__ import annotations

import aiohttp
import asyncpg
import pytest

from tokensforge.keys import hash_key

from .harness import ADMIN_TOKEN, Gw, gateway_settings, start_gateway, write_catalog


async def _admin_raw(gw: Gw, method: str, path: str, data: bytes | None, token: str | None = ADMIN_TOKEN):
    headers = {"authorization": f"Bearer {token}"} if token else {}
    async with gw.session.request(method, gw.url + path, data=data, headers=headers) as r:
        return r.status, await r.json(), r.headers


async def _money_snapshot(dsn: str) -> list:
    conn = await asyncpg.connect(dsn)
    try:
        return [tuple(r) for r in await conn.fetch(
            "SELECT account_id, bucket, balance_nanos, reserved_nanos FROM buckets ORDER BY 1, 2")] + [
            (await conn.fetchval("SELECT count(*) FROM ledger_entries"),)]
    finally:
        await conn.close()


async def test_account_lifecycle_and_view_without_secrets(gw: Gw) -> None:
    status, account = await gw.admin("POST", "/admin/accounts", {"name": "Acme"})
    assert status == 201 and account["id"].startswith("acct_")
    assert {b["bucket"] for b in account["buckets"]} == {"credit", "routed"}
    status, project = await gw.admin("POST", f"/admin/accounts/{account['id']}/projects",
                                     {"name": "research", "policy": {"allowed_route_kinds": ["routed"]}})
    assert status == 201 and project["policy"] == {"allowed_route_kinds": ["routed"]}
    status, key = await gw.admin("POST", f"/admin/accounts/{account['id']}/keys",
                                 {"name": "ci", "project_id": project["id"], "policy": {"rpm": 60}})
    assert status == 201 and key["key"].startswith("tf-") and len(key["key"]) >= 3 + 32
    status, entry = await gw.admin("POST", f"/admin/accounts/{account['id']}/topups",
                                   {"bucket": "routed", "amount_nanos": 2_500_000_000, "idempotency_key": "inv-1",
                                    "note": "invoice 1"})
    assert status == 201 and entry["kind"] == "topup" and entry["balance_after_nanos"] == 2_500_000_000
    assert entry["amount_usd"] == "2.500000000" and entry["idempotency_key"] == "inv-1"
    status, again = await gw.admin("POST", f"/admin/accounts/{account['id']}/topups",
                                   {"bucket": "routed", "amount_nanos": 2_500_000_000, "idempotency_key": "inv-1"})
    assert status == 200 and again["id"] == entry["id"] and again["replayed"] is True
    status, conflict = await gw.admin("POST", f"/admin/accounts/{account['id']}/topups",
                                      {"bucket": "routed", "amount_nanos": 1, "idempotency_key": "inv-1"})
    assert status == 409 and conflict["error"]["code"] == "idempotency_conflict"
    status, view = await gw.admin("GET", f"/admin/accounts/{account['id']}")
    assert status == 200 and view["projects"][0]["id"] == project["id"]
    assert view["keys"][0]["prefix"].startswith("tf-") and "key" not in view["keys"][0]
    assert key["key"] not in str(view)
    assert {b["bucket"]: b["balance_nanos"] for b in view["buckets"]} == {"credit": 0, "routed": 2_500_000_000}
    conn = await asyncpg.connect(gw.dsn)
    try:
        stored = await conn.fetchrow("SELECT * FROM api_keys WHERE id = $1", key["id"])
        dump = str([tuple(r) for r in await conn.fetch("SELECT * FROM api_keys")])
    finally:
        await conn.close()
    assert stored["key_hash"] == hash_key(key["key"]) and key["key"] not in dump


@pytest.mark.parametrize("path,body,status,param", [
    ("/admin/accounts", b"{oops", 400, None),
    ("/admin/accounts", b'{"name": 5}', 400, "name"),
    ("/admin/accounts/{acct}/topups", b'{"bucket": "gold", "amount_nanos": 5, "idempotency_key": "k"}', 400, "bucket"),
    ("/admin/accounts/{acct}/topups", b'{"bucket": "credit", "amount_nanos": 0, "idempotency_key": "k"}', 400,
     "amount_nanos"),
    ("/admin/accounts/{acct}/topups", b'{"bucket": "credit", "amount_nanos": -5, "idempotency_key": "k"}', 400,
     "amount_nanos"),
    ("/admin/accounts/{acct}/topups", b'{"bucket": "credit", "amount_nanos": 1.5, "idempotency_key": "k"}', 400,
     "amount_nanos"),
    ("/admin/accounts/{acct}/topups", b'{"bucket": "credit", "amount_nanos": "5", "idempotency_key": "k"}', 400,
     "amount_nanos"),
    ("/admin/accounts/{acct}/topups", b'{"bucket": "credit", "amount_nanos": 5}', 400, "idempotency_key"),
    ("/admin/accounts/acct_missing/topups", b'{"bucket": "credit", "amount_nanos": 5, "idempotency_key": "k"}', 404,
     "account_id"),
    ("/admin/accounts/{acct}/keys", b'{"name": "k", "policy": {"rpm": -1}}', 400, "policy.rpm"),
    ("/admin/accounts/{acct}/keys", b'{"name": "k", "policy": {"colour": "red"}}', 400, "policy.colour"),
    ("/admin/accounts/{acct}/keys", b'{"name": "k", "project_id": "proj_nope"}', 400, "project_id"),
    ("/admin/accounts/acct_missing/keys", b'{"name": "k"}', 404, None),
    ("/admin/accounts/{acct}/projects", b'{"name": "p", "policy": {"route_preference": "fastest"}}', 400,
     "policy.route_preference"),
    ("/admin/keys/key_missing/revoke", b"", 404, None),
])
async def test_bad_admin_input_is_a_clear_4xx_and_changes_nothing(gw: Gw, path, body, status, param) -> None:
    _, account = await gw.admin("POST", "/admin/accounts", {"name": "Acme"})
    await gw.admin("POST", f"/admin/accounts/{account['id']}/topups",
                   {"bucket": "credit", "amount_nanos": 10, "idempotency_key": "seed"})
    before = await _money_snapshot(gw.dsn)
    got, answer, headers = await _admin_raw(gw, "POST", path.format(acct=account["id"]), body)
    assert got == status, answer
    assert answer["error"]["message"] and answer["error"]["param"] == param
    assert headers["x-should-retry"] == "false" and headers["x-request-id"].startswith("req_")
    assert await _money_snapshot(gw.dsn) == before


async def test_admin_requires_the_token(gw: Gw) -> None:
    status, body, _ = await _admin_raw(gw, "POST", "/admin/accounts", b'{"name": "x"}', token="wrong")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body, _ = await _admin_raw(gw, "POST", "/admin/accounts", b'{"name": "x"}', token=None)
    assert status == 401


async def test_ops_endpoints(gw: Gw) -> None:
    async with gw.session.get(gw.url + "/healthz") as r:
        assert r.status == 200
    async with gw.session.get(gw.url + "/readyz") as r:
        assert r.status == 200 and (await r.json())["checks"] == {"catalog": True, "database": True}
    async with gw.session.get(gw.url + "/metrics") as r:
        text = await r.text()
        assert r.status == 200 and "tokensforge_ledger_op_duration_seconds" in text
    async with gw.session.get(gw.url + "/nope") as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"


async def test_without_an_admin_token_the_admin_api_is_disabled_and_says_so(
        dsn: str, mock_upstream, tmp_path, caplog) -> None:
    settings = gateway_settings(write_catalog(tmp_path / "c.toml", mock_upstream.url), admin_token=None)
    with caplog.at_level("WARNING", logger="tokensforge"):
        ctx, url, _ = await start_gateway(settings, dsn)
    assert any("admin API is disabled" in r.getMessage() for r in caplog.records)
    async with ctx, aiohttp.ClientSession() as session:
        async with session.post(url + "/admin/accounts", json={"name": "x"},
                                headers={"authorization": "Bearer anything"}) as r:
            body = await r.json()
            assert r.status == 403 and body["error"]["code"] == "admin_disabled"
