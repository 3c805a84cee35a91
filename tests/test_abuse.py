"""Abuse resistance: bad keys, a saturated pool, slow clients, probe floods, rate-limit memory,
secrets in repr, and bad input that must get a 4xx (SPEC §5.6), never a 500."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import yarl

from tokensforge.app import create_app
from tokensforge.catalog import load_catalog
from tokensforge.errors import RateLimited
from tokensforge.keys import new_key
from tokensforge.ratelimit import RateLimiter
from tokensforge.server import listening_socket, running
from tokensforge.settings import Settings
from tokensforge.state import KeyCache

from .harness import ADMIN_TOKEN, Gw, Mock, gateway_of, gateway_settings, write_catalog

MESSAGES = [{"role": "user", "content": "hello"}]


@contextlib.asynccontextmanager
async def gateway(dsn: str, mock: Mock, tmp_path: Path, *, server: dict[str, float] | None = None,
                  **overrides: Any) -> AsyncIterator[Gw]:
    """A gateway with its own settings (and `running()` options), stopped on the way out."""
    await mock.reset()
    settings = gateway_settings(write_catalog(tmp_path / "catalog.toml", mock.url), **overrides)
    assert settings.config_path is not None
    app = create_app(settings, load_catalog(settings.config_path), dsn)
    sock = listening_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    async with running(app, sock, **(server or {})), aiohttp.ClientSession() as session:
        yield Gw(url, dsn, gateway_of(app), mock, session)


# ------------------------------------------------------------------ 1. unknown keys: a negative cache


async def listening(gw: Gw) -> None:
    """Wait for the NOTIFY listener: when it (re)connects it drops every cached key, by design."""
    conn = await asyncpg.connect(gw.dsn)
    try:
        for _ in range(100):
            if await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                                   " AND query LIKE 'LISTEN %'"):
                break
            await asyncio.sleep(0.02)
    finally:
        await conn.close()
    await asyncio.sleep(0.05)


async def test_an_unknown_key_costs_one_database_query_however_often_it_is_tried(gw: Gw) -> None:
    await listening(gw)
    bad = new_key()
    before = gw.gateway.accounts.identity_queries
    statuses = await asyncio.gather(*(gw.get("/v1/balance", bad) for _ in range(40)))  # concurrent
    deadline = time.monotonic() + 0.8  # past the 0.5 s TTL of known keys
    while time.monotonic() < deadline:
        statuses.append(await gw.get("/v1/balance", bad))
        await asyncio.sleep(0.02)
    assert {status for status, _ in statuses} == {401}
    assert {body["error"]["code"] for _, body in statuses} == {"invalid_api_key"}
    assert gw.gateway.accounts.identity_queries - before == 1


async def test_a_flood_of_random_keys_is_bounded_and_does_not_evict_known_keys(gw: Gw) -> None:
    _, good = await gw.account(credit=10**9)
    cache = KeyCache(gw.gateway.accounts, ttl_s=60, unknown_ttl_s=60, unknown_max=8)
    assert await cache.lookup(good) is not None
    for _ in range(50):
        assert await cache.lookup(new_key()) is None
    assert cache.unknown_cached() == 8
    before = gw.gateway.accounts.identity_queries
    assert await cache.lookup(good) is not None
    assert gw.gateway.accounts.identity_queries == before  # still cached


async def test_a_key_created_after_it_was_tried_works_at_once_through_notify(gw: Gw) -> None:
    account_id, _ = await gw.account(credit=10**9)
    await listening(gw)  # and the NOTIFY of that key's creation has landed
    plaintext = new_key()
    assert (await gw.get("/v1/balance", plaintext))[0] == 401
    # another gateway process creates the key (the demo does so with a known plaintext)
    await gw.gateway.accounts.create_key(account_id, "late", None, {}, plaintext=plaintext)
    assert (await gw.get("/v1/balance", plaintext))[0] == 401  # the miss is cached...
    conn = await asyncpg.connect(gw.dsn)
    try:
        await conn.execute("SELECT pg_notify('tokensforge', 'keys')")  # ...until key creation says so
    finally:
        await conn.close()
    started = time.monotonic()
    status = 0
    while time.monotonic() - started < 2 and status != 200:
        status, _ = await gw.get("/v1/balance", plaintext)
        await asyncio.sleep(0.02)
    assert status == 200
    assert time.monotonic() - started < 2 < gw.gateway.settings.unknown_key_cache_ttl_s


async def test_without_a_notification_a_late_key_works_once_the_unknown_ttl_passed(gw: Gw) -> None:
    account_id, _ = await gw.account(credit=10**9)
    cache = KeyCache(gw.gateway.accounts, ttl_s=0.5, unknown_ttl_s=0.3)
    plaintext = new_key()
    assert await cache.lookup(plaintext) is None
    await gw.gateway.accounts.create_key(account_id, "late", None, {}, plaintext=plaintext)
    assert await cache.lookup(plaintext) is None
    await asyncio.sleep(0.35)
    caller = await cache.lookup(plaintext)
    assert caller is not None and caller[0].account_id == account_id


async def test_the_admin_api_clears_cached_misses_when_it_creates_a_key(gw: Gw) -> None:
    account_id, _ = await gw.account()
    await listening(gw)
    await gw.get("/v1/balance", new_key())
    assert gw.gateway.keys.unknown_cached() == 1
    status, _ = await gw.admin("POST", f"/admin/accounts/{account_id}/keys", {"name": "k2"})
    assert status == 201 and gw.gateway.keys.unknown_cached() == 0


# ------------------------------------------------------------------ 2. a saturated pool fails closed


async def test_a_request_that_cannot_get_a_pool_connection_gets_503_ledger_unavailable(
        dsn: str, mock_upstream: Mock, tmp_path: Path) -> None:
    async with gateway(dsn, mock_upstream, tmp_path, db_pool_size=1, db_acquire_timeout_s=0.3,
                       key_cache_ttl_s=60, sweep_interval_s=60) as gw:
        _, key = await gw.account(credit=10**9)
        assert (await gw.get("/v1/balance", key))[0] == 200  # the key is cached now
        served_before = (await mock_upstream.stats())["requests"]
        timeout = aiohttp.ClientTimeout(total=5)
        async with gw.gateway.pool.acquire(timeout=5):  # the only connection is busy
            started = time.monotonic()
            async with gw.session.get(gw.url + "/v1/balance", timeout=timeout,
                                      headers={"authorization": f"Bearer {key}"}) as r:
                assert r.status == 503 and (await r.json())["error"]["code"] == "ledger_unavailable"
            async with gw.session.post(gw.url + "/v1/chat/completions", timeout=timeout, json={
                    "model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 1},
                    headers={"authorization": f"Bearer {key}"}) as r:
                assert r.status == 503 and (await r.json())["error"]["code"] == "ledger_unavailable"
            assert time.monotonic() - started < 2
        assert (await mock_upstream.stats())["requests"] == served_before  # nothing served unbilled
        balance = (await gw.balances(key))["credit"]
        assert balance["balance_nanos"] == 10**9 and balance["reserved_nanos"] == 0


def test_a_pool_of_one_connection_can_be_configured() -> None:
    settings = Settings.from_env({"TOKENSFORGE_DB_POOL_SIZE": "1", "TOKENSFORGE_DB_ACQUIRE_TIMEOUT_S": "0.25"})
    assert (settings.db_pool_size, settings.db_acquire_timeout_s) == (1, 0.25)


# ------------------------------------------------------------------ 3. slow clients are disconnected


async def _closed_within(reader: asyncio.StreamReader, timeout_s: float) -> bytes:
    """Everything the server sends until it closes the connection (fails if it does not in time)."""
    received = b""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                return received
            if not chunk:
                return received
            received += chunk


async def _trickle(writer: asyncio.StreamWriter, data: bytes, interval_s: float) -> None:
    with contextlib.suppress(ConnectionError):
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(interval_s)


async def test_a_client_that_never_finishes_its_request_head_is_disconnected(
        dsn: str, mock_upstream: Mock, tmp_path: Path) -> None:
    async with gateway(dsn, mock_upstream, tmp_path, server={"keepalive_timeout_s": 0.5}) as gw:
        url = yarl.URL(gw.url)
        silent = await asyncio.open_connection(url.host, url.port)
        slow = await asyncio.open_connection(url.host, url.port)
        try:
            silent[1].write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # half a head, then nothing
            slow[1].write(b"GET /healthz HTTP/1.1\r\n")  # slowloris: one header byte every 50 ms
            trickle = asyncio.create_task(_trickle(slow[1], b"X-Slow: " + b"a" * 200, 0.05))
            started = time.monotonic()
            assert await _closed_within(silent[0], 3) == b""
            assert await _closed_within(slow[0], 3) == b""
            assert time.monotonic() - started < 2
            trickle.cancel()
            await asyncio.gather(trickle, return_exceptions=True)
        finally:
            silent[1].close()
            slow[1].close()
        async with gw.session.get(gw.url + "/healthz") as r:  # a prompt client is served as ever
            assert r.status == 200


async def test_a_client_that_sends_its_body_too_slowly_gets_408_and_is_disconnected(
        dsn: str, mock_upstream: Mock, tmp_path: Path) -> None:
    async with gateway(dsn, mock_upstream, tmp_path, server={"keepalive_timeout_s": 5, "lingering_s": 0.3},
                       body_read_timeout_s=0.5) as gw:
        url = yarl.URL(gw.url)
        reader, writer = await asyncio.open_connection(url.host, url.port)
        try:
            writer.write(b"POST /admin/accounts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Authorization: Bearer " + ADMIN_TOKEN.encode() + b"\r\nContent-Length: 1000\r\n\r\n")
            trickle = asyncio.create_task(_trickle(writer, b'{"name": "' + b"a" * 980 + b'"}', 0.05))
            started = time.monotonic()
            received = await _closed_within(reader, 4)
            elapsed = time.monotonic() - started
            trickle.cancel()
            await asyncio.gather(trickle, return_exceptions=True)
        finally:
            writer.close()
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), received[:200]
        assert orjson.loads(body)["error"]["code"] == "request_timeout"
        assert elapsed < 2.5  # 0.5 s for the body, 0.3 s of lingering, then the connection is closed


# ------------------------------------------------------------------ 4. /readyz reads a cached probe


async def test_readyz_answers_from_the_probe_without_a_query_per_call(
        dsn: str, mock_upstream: Mock, tmp_path: Path) -> None:
    async with gateway(dsn, mock_upstream, tmp_path, sweep_interval_s=60) as gw:
        acquired = gw.gateway.pool.acquired
        started = time.monotonic()
        for _ in range(100):
            async with gw.session.get(gw.url + "/readyz") as r:
                body = await r.json()
                assert r.status == 200 and body["checks"] == {"catalog": True, "database": True}
                assert 0 <= body["database_checked_ms_ago"] <= 2000
        probes = (time.monotonic() - started) / 0.5 + 2  # the background probe, every 0.5 s
        assert gw.gateway.pool.acquired - acquired <= probes < 100


async def test_readyz_turns_503_within_two_seconds_of_the_database_going_away(
        pg: Any, dsn: str, mock_upstream: Mock, tmp_path: Path) -> None:
    name = yarl.URL(dsn).path.lstrip("/")
    admin = await asyncpg.connect(pg.admin_dsn("postgres"))
    try:
        async with gateway(dsn, mock_upstream, tmp_path) as gw:
            async with gw.session.get(gw.url + "/readyz") as r:
                assert r.status == 200
            # the database refuses this gateway: new connections fail, existing ones are cut
            await admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
            started = time.monotonic()
            status = 200
            while status == 200 and time.monotonic() - started < 4:
                async with gw.session.get(gw.url + "/readyz") as r:
                    status, body = r.status, await r.json()
                await asyncio.sleep(0.05)
            assert status == 503 and body["checks"]["database"] is False
            assert time.monotonic() - started < 2.5
            await admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
            started = time.monotonic()
            while status != 200 and time.monotonic() - started < 4:
                async with gw.session.get(gw.url + "/readyz") as r:
                    status = r.status
                await asyncio.sleep(0.05)
            assert status == 200  # back by itself
    finally:
        await admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        await admin.close()


# ------------------------------------------------------------------ 5. rate-limiter memory is bounded


def test_idle_rate_limit_scopes_are_dropped() -> None:
    limiter = RateLimiter()
    for i in range(10_000):
        limiter.admit(f"key:{i}", 10, None, 1, now=i * 0.001)
    assert limiter.scopes() == 10_000
    limiter.admit("key:late", 10, None, 1, now=200.0)
    assert limiter.scopes() == 1


def test_a_busy_scope_holds_one_slot_per_second_not_one_entry_per_request() -> None:
    limiter = RateLimiter()
    for i in range(60_000):  # 1,000 requests a second for a minute
        limiter.admit("key:busy", None, 10**9, 3, now=i * 0.001)
    assert limiter.slots("key:busy") <= 61
    with pytest.raises(RateLimited):  # still every token of the last minute counts
        limiter.admit("key:busy", None, 60_000 * 3, 1, now=59.9995)


def test_rpm_keeps_its_sliding_minute() -> None:
    limiter = RateLimiter()
    for t in (0.0, 10.0, 20.0):
        limiter.admit("key:a", 3, None, 1, now=t)
    with pytest.raises(RateLimited) as info:
        limiter.admit("key:a", 3, None, 1, now=30.0)
    assert info.value.headers["retry-after"] == "30"
    assert info.value.body()["error"]["limit_scope"] == "key"
    limiter.admit("key:a", 3, None, 1, now=60.0)  # the request at 0 left the window
    with pytest.raises(RateLimited):  # a refused request is not counted, the admitted one is
        limiter.admit("key:a", 3, None, 1, now=60.5)
    limiter.admit("key:b", 3, None, 1, now=30.0)  # scopes are separate


def test_tpm_waits_for_enough_tokens_to_leave_the_window() -> None:
    limiter = RateLimiter()
    limiter.admit("project:p", None, 250, 100, now=0.0)
    limiter.admit("project:p", None, 250, 100, now=30.0)
    with pytest.raises(RateLimited) as info:
        limiter.admit("project:p", None, 250, 100, now=40.0)
    assert info.value.headers["retry-after"] == "20" and "tokens" in info.value.message
    limiter.admit("project:p", None, 250, 50, now=40.0)  # fits exactly
    with pytest.raises(RateLimited) as info:
        limiter.admit("project:p", None, 250, 300, now=41.0)  # can never fit
    assert info.value.headers["retry-after"] == "60"
    limiter.admit("project:p", None, 250, 100, now=60.0)


# ------------------------------------------------------------------ 6. secrets stay out of repr


def test_settings_repr_shows_no_secret() -> None:
    settings = Settings.from_env({
        "TOKENSFORGE_ADMIN_TOKEN": "adm-very-secret", "OPENAI_API_KEY": "sk-very-secret",
        "TOKENSFORGE_DATABASE_URL": "postgresql://tf:pw-very-secret@db/tf", "TOKENSFORGE_DB_POOL_SIZE": "7"})
    assert settings.admin_token == "adm-very-secret" and settings.channel_env["OPENAI_API_KEY"] == "sk-very-secret"
    for text in (repr(settings), str(settings), f"{settings}"):
        assert "very-secret" not in text
        assert "db_pool_size=7" in text  # the rest is still there to debug with


# ------------------------------------------------------------------ 7. bad input gets a 400, not a 500


async def _raw(gw: Gw, method: str, path: str, *, key: str | None = None, body: bytes | None = None
               ) -> tuple[int, Any, dict[str, str]]:
    """A request with the path sent exactly as written (percent escapes included)."""
    token = key or ADMIN_TOKEN
    async with gw.session.request(method, yarl.URL(gw.url + path, encoded=True), data=body, headers={
            "authorization": f"Bearer {token}", "content-type": "application/json"}) as r:
        return r.status, await r.json(), {k.lower(): v for k, v in r.headers.items()}


def _nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth - 1):
        value = [value]
    return value


def _deep(body: dict[str, Any], key: str, depth: int) -> bytes:
    """`body` with `body[key]` arrays nested `depth` deep (orjson.dumps itself stops at 254)."""
    return orjson.dumps({**body, key: "@@"}).replace(b'"@@"', b"[" * depth + b'"x"' + b"]" * depth)


CLIENT_BAD = [
    ("GET", "/v1/usage?after=99999999999999999999", None, "after"),
    ("GET", "/v1/ledger?after=99999999999999999999", None, "after"),
    ("GET", "/v1/usage?after=%D9%A3", None, "after"),  # an Arabic-Indic digit is a digit to str.isdigit
    ("GET", "/v1/usage?limit=%C2%B2", None, "limit"),  # '²' too, and int() refuses it
    ("GET", "/v1/usage?model=a%00b", None, "model"),
    ("GET", "/v1/ledger?bucket=credit%00", None, "bucket"),
    ("GET", "/v1/receipts/req%00x", None, "request_id"),
    ("POST", "/v1/chat/completions", _deep({"model": "gpt-4o-mini", "messages": MESSAGES}, "metadata", 300), None),
    ("POST", "/v1/chat/completions", _deep({"model": "gpt-4o-mini", "messages": MESSAGES}, "metadata", 1000), None),
    ("POST", "/v1/quote", _deep({"model": "gpt-4o-mini", "messages": MESSAGES}, "tools", 100), None),
    ("POST", "/v1/embeddings", _deep({"model": "embed-small"}, "input", 64), None),
]


@pytest.mark.parametrize(("method", "path", "body", "param"), CLIENT_BAD)
async def test_bad_client_input_gets_400_and_changes_nothing(
        gw: Gw, method: str, path: str, body: Any, param: str | None) -> None:
    _, key = await gw.account(credit=10**9, routed=10**9)
    before = await gw.balances(key)
    status, answer, headers = await _raw(gw, method, path, key=key, body=body)
    assert status == 400, answer
    assert answer["error"]["code"] == "invalid_request" and answer["error"]["param"] == param
    assert headers["x-should-retry"] == "false" and headers["x-request-id"].startswith("req_")
    if body is not None:
        assert "nested" in answer["error"]["message"] or "not valid JSON" in answer["error"]["message"]
    assert await gw.balances(key) == before
    _, usage = await gw.get("/v1/usage", key)
    assert usage["data"] == []


async def test_the_largest_cursor_and_a_body_64_levels_deep_are_fine(gw: Gw) -> None:
    _, key = await gw.account(credit=10**9)
    status, page, _ = await _raw(gw, "GET", "/v1/usage?after=9223372036854775807", key=key)
    assert status == 200 and page["data"] == []
    completion = await gw.client(key).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=1, metadata={"deep": _nested(62)})  # 64 with the body
    assert completion.model_extra["receipt"]["status"] == "succeeded"


ADMIN_BAD = [
    ("GET", "/admin/accounts/{acct}%00", None, "account_id"),
    ("POST", "/admin/accounts", {"name": "a\x00b"}, "name"),
    ("POST", "/admin/accounts", _deep({"name": "deep"}, "x", 70), None),
    ("POST", "/admin/accounts/{acct}%00x/projects", {"name": "p"}, "account_id"),
    ("POST", "/admin/accounts/{acct}/projects", {"name": "p\x00"}, "name"),
    ("POST", "/admin/accounts/{acct}/projects", {"name": "p", "policy": {"allowed_models": ["gpt\x00"]}}, "policy"),
    ("POST", "/admin/accounts/{acct}/keys", {"name": "k\x00"}, "name"),
    ("POST", "/admin/accounts/{acct}/keys", {"name": "k", "project_id": "proj\x00"}, "project_id"),
    ("POST", "/admin/accounts/{acct}/keys", {"name": "k", "policy": {"allowed_buckets": ["credit\x00"]}}, "policy"),
    ("POST", "/admin/keys/key%00x/revoke", None, "key_id"),
    ("POST", "/admin/accounts/{acct}/topups",
     {"bucket": "credit", "amount_nanos": 5, "idempotency_key": "i\x00"}, "idempotency_key"),
    ("POST", "/admin/accounts/{acct}/topups",
     {"bucket": "credit", "amount_nanos": 5, "idempotency_key": "i", "note": "n\x00"}, "note"),
    ("POST", "/admin/accounts/{acct}%00/topups",
     {"bucket": "credit", "amount_nanos": 5, "idempotency_key": "i"}, "account_id"),
]


@pytest.mark.parametrize(("method", "path", "body", "param"), ADMIN_BAD)
async def test_bad_admin_input_gets_400_and_changes_nothing(
        gw: Gw, method: str, path: str, body: Any, param: str | None) -> None:
    account_id, key = await gw.account()
    raw = body if isinstance(body, bytes | None) else orjson.dumps(body)
    status, answer, headers = await _raw(gw, method, path.format(acct=account_id), body=raw)
    assert status == 400, answer
    assert answer["error"]["code"] == "invalid_request" and answer["error"]["param"] == param
    assert headers["x-should-retry"] == "false"
    status, account = await gw.admin("GET", f"/admin/accounts/{account_id}")
    assert status == 200 and len(account["keys"]) == 1 and account["projects"] == []
    assert {b["balance_nanos"] for b in account["buckets"]} == {0}
