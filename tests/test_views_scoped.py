"""Scoped views (SPEC §2): a project's key sees its project's usage, ledger charges, receipts, spend and
research reports, never its siblings'; an account-wide key sees the whole account. Real PostgreSQL,
real gateway, real HTTP."""

from __future__ import annotations

from typing import Any

from .harness import Gw


async def _project_key(gw: Gw, account_id: str, name: str) -> tuple[str, str]:
    status, project = await gw.admin("POST", f"/admin/accounts/{account_id}/projects", {"name": name, "policy": {}})
    assert status == 201, project
    status, key = await gw.admin("POST", f"/admin/accounts/{account_id}/keys",
                                 {"name": name, "project_id": project["id"], "policy": {}})
    assert status == 201, key
    return project["id"], key["key"]


async def _chat(gw: Gw, key: str) -> dict[str, Any]:
    status, body, _ = await gw.post("/v1/chat/completions", key, {
        "model": "gpt-4o-mini", "max_tokens": 16, "messages": [{"role": "user", "content": "hello"}]})
    assert status == 200, body
    receipt: dict[str, Any] = body["receipt"]
    return receipt


async def test_a_project_key_sees_its_project_only_and_an_account_key_sees_all(gw: Gw) -> None:
    account_id, wide = await gw.account(credit=10**9, routed=10**9)
    p1, key1 = await _project_key(gw, account_id, "one")
    p2, key2 = await _project_key(gw, account_id, "two")
    mine, sibling, own = await _chat(gw, key1), await _chat(gw, key2), await _chat(gw, wide)
    assert mine["project_id"] == p1 and sibling["project_id"] == p2 and own["project_id"] is None

    # usage: JSON and CSV
    _, listed = await gw.get("/v1/usage", key1)
    assert [r["request_id"] for r in listed["data"]] == [mine["request_id"]]
    _, listed = await gw.get("/v1/usage", wide)
    assert {r["request_id"] for r in listed["data"]} == {mine["request_id"], sibling["request_id"], own["request_id"]}
    async with gw.session.get(gw.url + "/v1/usage?format=csv", headers={"authorization": f"Bearer {key2}"}) as r:
        text = await r.text()
    assert sibling["request_id"] in text and mine["request_id"] not in text and own["request_id"] not in text
    # even asked for by id, a sibling's record is not there
    chat_id = "chatcmpl-" + sibling["request_id"].removeprefix("req_")
    _, found = await gw.get(f"/v1/usage?id={chat_id}", key1)
    assert found["data"] == []
    _, found = await gw.get(f"/v1/usage?id={chat_id}", wide)
    assert [r["request_id"] for r in found["data"]] == [sibling["request_id"]]

    # receipts
    status, body = await gw.get(f"/v1/receipts/{sibling['request_id']}", key1)
    assert status == 404 and "project" in body["error"]["message"]
    status, _ = await gw.get(f"/v1/receipts/{own['request_id']}", key1)
    assert status == 404
    status, body = await gw.get(f"/v1/receipts/{mine['request_id']}", key1)
    assert status == 200 and body["charge_nanos"] == mine["charge_nanos"]
    for receipt in (mine, sibling, own):
        status, body = await gw.get(f"/v1/receipts/{receipt['request_id']}", wide)
        assert status == 200 and body["request_id"] == receipt["request_id"]

    # ledger: the account's own entries (top-ups) and this project's charges only
    _, ledger = await gw.get("/v1/ledger?limit=100", key1)
    charges = [e for e in ledger["data"] if e["kind"] == "charge"]
    assert [e["request_id"] for e in charges] == [mine["request_id"]]
    assert charges[0]["id"] == mine["ledger_entry_id"]
    assert {e["kind"] for e in ledger["data"]} == {"charge", "topup"}
    _, ledger = await gw.get("/v1/ledger?limit=100", wide)
    assert {e["request_id"] for e in ledger["data"] if e["kind"] == "charge"} == {
        mine["request_id"], sibling["request_id"], own["request_id"]}

    # spend summary
    _, summary = await gw.get("/v1/usage/summary", key2)
    assert summary["top_models"] == [{"model": "gpt-4o-mini", "requests": 1, "charge_nanos": sibling["charge_nanos"]}]
    assert sum(p["charge_nanos"] for s in summary["series"] for p in s["points"]) == sibling["charge_nanos"]
    _, summary = await gw.get("/v1/usage/summary", wide)
    assert summary["top_models"][0]["requests"] == 3


async def test_research_reports_are_scoped_to_the_project_that_wrote_them(gw: Gw) -> None:
    account_id, wide = await gw.account(credit=10**9)
    _, key1 = await _project_key(gw, account_id, "one")
    _, key2 = await _project_key(gw, account_id, "two")
    status, report, _ = await gw.post("/v1/research/reports", key1, {
        "topic": "Basis", "model": "gpt-4o-mini", "sections": ["Overview"], "max_charge_nanos": 10**8})
    assert status == 200 and report["status"] == "completed", report
    for key, visible in ((key1, True), (wide, True), (key2, False)):
        _, listed = await gw.get("/v1/research/reports", key)
        assert [r["id"] for r in listed["data"]] == ([report["id"]] if visible else [])
        status, body = await gw.get(f"/v1/research/reports/{report['id']}", key)
        assert status == (200 if visible else 404), body
        status, _ = await gw.get(f"/v1/receipts/{report['sections'][0]['receipt']['request_id']}", key)
        assert status == (200 if visible else 404)
