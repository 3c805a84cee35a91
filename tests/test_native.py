"""Native first (SPEC §1): a channel that speaks the client's API gets the client's body as sent — only the
model, the output cap and the stream-usage switch rewritten — and its answer comes back as it was sent, with
the gateway's id, the model the client asked for and the receipt. Across dialects the canonical core
translates, and the receipt says which happened (`relay`)."""

from __future__ import annotations

import asyncio
from typing import Any

import anthropic
import orjson

from .harness import Gw

FUNDS = 10**9

#: what Claude Code sends besides the basics: cache markers everywhere, thinking, betas' fields, metadata
AGENT_MESSAGES: dict[str, Any] = {
    "model": "claude-test",
    "max_tokens": 300,
    "system": [{"type": "text", "text": "You are a coding agent.", "cache_control": {"type": "ephemeral"}}],
    "tools": [{"name": "Read", "description": "Read a file",
               "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}},
               "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
    "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Say hello.", "cache_control": {"type": "ephemeral"}}]}],
    "metadata": {"user_id": "user_abc"},
    "context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]},
    "output_config": {"effort": "low"},
    "temperature": 1,
    "x_future_field": {"kept": ["as", "sent"]},
}


async def test_messages_reach_an_anthropic_channel_as_sent(gw: Gw) -> None:
    _, key = await gw.account(credit=FUNDS)
    status, body, headers = await gw.post("/v1/messages", key, AGENT_MESSAGES,
                                          {"anthropic-beta": "context-management-2025-06-27"})
    assert status == 200, body
    sent = (await gw.mock.stats())["last_request"]
    assert sent["path"] == "/v1/messages"
    assert sent["body"] == {**AGENT_MESSAGES, "model": "up-claude", "max_tokens": 300}
    assert sent["headers"]["anthropic-beta"] == "context-management-2025-06-27"
    assert body["model"] == "claude-test" and body["id"].startswith("msg_")
    assert body["receipt"]["relay"] == "native" and body["receipt"]["upstream_model"] == "up-claude"
    assert headers["x-tokensforge-upstream-model"] == "up-claude"
    await gw.assert_billed(key, body["receipt"], body["id"])


async def test_chat_reaches_an_openai_channel_as_sent(gw: Gw) -> None:
    _, key = await gw.account(credit=FUNDS)
    request = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50,
               "prompt_cache_key": "agent-1", "prompt_cache_retention": "24h", "metadata": {"run": "7"},
               "x_future_field": [1, 2.5, "three"], "stream": True}
    async with gw.session.post(gw.url + "/v1/chat/completions", data=orjson.dumps(request),
                               headers={"authorization": f"Bearer {key}"}) as r:
        assert r.status == 200
        events = [line for line in (await r.read()).split(b"\n\n") if line.startswith(b"data: {")]
    sent = (await gw.mock.stats())["last_request"]["body"]
    assert sent == {**request, "model": "up-official", "stream_options": {"include_usage": True}}
    chunks = [orjson.loads(e[6:]) for e in events]
    assert chunks and all(c["model"] == "gpt-4o-mini" for c in chunks)
    assert not any(c.get("usage") for c in chunks), "the client did not ask for usage"


async def test_answers_name_the_model_asked_never_the_relay(gw: Gw) -> None:
    _, key = await gw.account(routed=FUNDS)
    client = gw.client(key)
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
        extra_headers={"x-tokensforge-route": "routed"})
    completion = raw.parse()
    assert completion.model == "gpt-4o-mini"
    assert raw.headers["x-tokensforge-upstream-model"] in ("up-relay-a", "up-relay-b")
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True,
        stream_options={"include_usage": True}, extra_headers={"x-tokensforge-route": "routed"})
    models = {chunk.model async for chunk in stream}
    assert models == {"gpt-4o-mini"}


async def test_a_messages_stream_is_relayed_with_the_receipt_on_its_last_delta(gw: Gw) -> None:
    _, key = await gw.account(credit=FUNDS)
    async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0) as claude:
        async with claude.messages.stream(model="claude-test", max_tokens=40,
                                          messages=[{"role": "user", "content": "Say hello."}]) as stream:
            kinds = [event.type async for event in stream]
            message = await stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert message.model == "claude-test" and message.id.startswith("msg_")
    sent = (await gw.mock.stats())["last_request"]["body"]
    assert sent["model"] == "up-claude" and sent["stream"] is True and "stream_options" not in sent
    status, receipt = await gw.get(f"/v1/receipts/{message.id}", key)
    assert status == 200 and receipt["relay"] == "native"
    assert receipt["usage"]["completion_tokens"] == message.usage.output_tokens
    await gw.assert_billed(key, receipt, message.id)


async def test_across_dialects_the_receipt_says_translated(gw: Gw) -> None:
    _, key = await gw.account(credit=FUNDS)
    status, body, _ = await gw.post("/v1/messages", key, {
        "model": "gpt-4o-mini", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200, body
    assert body["model"] == "gpt-4o-mini" and body["receipt"]["relay"] == "translated"
    assert (await gw.mock.stats())["last_request"]["path"] == "/v1/chat/completions"
    status, chat, _ = await gw.post("/v1/chat/completions", key, {
        "model": "claude-test", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200, chat
    assert chat["model"] == "claude-test" and chat["receipt"]["relay"] == "translated"
    assert (await gw.mock.stats())["last_request"]["path"] == "/v1/messages"


#: what Codex sends to a Responses channel (tests/fixtures/agents/ has whole recorded requests)
CODEX_LIKE: dict[str, Any] = {
    "model": "gpt-5-mini",
    "input": [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Be terse."}]},
              {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}],
    "reasoning": {"effort": "low", "summary": "auto"},
    "include": ["reasoning.encrypted_content"],
    "store": False,
    "prompt_cache_key": "thread-1",
    "max_output_tokens": 200,
    "tool_choice": "auto",
    "parallel_tool_calls": True,
}


async def test_responses_reach_a_responses_channel_as_sent_with_reasoning_intact(gw: Gw) -> None:
    _, key = await gw.account(credit=FUNDS)
    status, body, headers = await gw.post("/v1/responses", key, CODEX_LIKE)
    assert status == 200, body
    sent = (await gw.mock.stats())["last_request"]
    assert sent["path"] == "/v1/responses"
    assert sent["body"] == {**CODEX_LIKE, "model": "up-responses"}
    assert body["id"].startswith("resp_") and body["model"] == "gpt-5-mini"
    reasoning = [item for item in body["output"] if item["type"] == "reasoning"]
    assert reasoning and reasoning[0]["encrypted_content"], "reasoning items pass through unchanged"
    receipt = body["receipt"]
    assert receipt["relay"] == "native" and receipt["usage"]["reasoning_tokens"] > 0
    assert receipt["usage"]["completion_tokens"] == body["usage"]["output_tokens"]
    await gw.assert_billed(key, receipt, body["id"])


async def test_a_responses_stream_is_relayed_with_the_receipt_on_its_terminal_event(gw: Gw) -> None:
    _, key = await gw.account(credit=FUNDS)
    client = gw.client(key)
    async with client.responses.stream(model="gpt-5-mini", input="Count to three.", max_output_tokens=50,
                                       reasoning={"effort": "low"}) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert final.id.startswith("resp_") and final.model == "gpt-5-mini" and final.output_text
    assert final.model_extra is not None and final.model_extra["receipt"]["relay"] == "native"
    sent = (await gw.mock.stats())["last_request"]["body"]
    assert sent["model"] == "up-responses" and sent["max_output_tokens"] == 50
    stored = await client.responses.retrieve(final.id)
    assert stored.id == final.id and stored.output_text == final.output_text
    await gw.assert_billed(key, final.model_extra["receipt"], final.id)


async def test_a_follow_up_names_the_upstreams_own_id_on_the_same_channel(gw: Gw) -> None:
    _, key = await gw.account(credit=FUNDS, routed=FUNDS)
    client = gw.client(key)
    first = await client.responses.create(model="gpt-5-mini", input="Remember the word ledger.",
                                          max_output_tokens=30)
    upstream_first = (await gw.mock.stats())["last_request"]
    second = await client.responses.create(model="gpt-5-mini", input="Which word?", previous_response_id=first.id,
                                           max_output_tokens=30)
    sent = (await gw.mock.stats())["last_request"]["body"]
    assert second.model == "gpt-5-mini"
    assert sent["previous_response_id"] != first.id and sent["previous_response_id"].startswith("resp")
    assert sent["input"] == "Which word?", "the upstream keeps the conversation itself"
    assert upstream_first["body"]["input"] == "Remember the word ledger."
    # a channel that never saw the first turn gets it in front of the input instead (translated to chat)
    third = await client.responses.create(model="gpt-5-mini", input="Again?", previous_response_id=first.id,
                                          max_output_tokens=30, extra_headers={"x-tokensforge-route": "routed"})
    sent = (await gw.mock.stats())["last_request"]
    assert third.model == "gpt-5-mini" and sent["path"] == "/v1/chat/completions"
    texts = orjson.dumps(sent["body"]["messages"]).decode()
    assert "Remember the word ledger." in texts and "Again?" in texts


async def test_a_client_that_leaves_after_the_upstream_answered_pays_the_prompt(gw: Gw) -> None:
    """SPEC §1: the upstream has read (and bills) the whole prompt once it answered; a streaming client that
    reads the first event and leaves pays that input, on every route, even with no content delivered."""
    _, key = await gw.account(credit=FUNDS)
    await gw.mock.faults(**{"up-official": {"first_token_delay_ms": 1500}})
    prompt = "ledger " * 40_000  # 280 kB
    async with gw.session.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                               data=orjson.dumps({"model": "gpt-4o-mini", "max_tokens": 20, "stream": True,
                                                  "messages": [{"role": "user", "content": prompt}]})) as r:
        assert r.status == 200
        request_id = r.headers["x-request-id"]
        first = await r.content.readline()
        assert first.startswith(b"data: ") and b'"content":""' in first.replace(b" ", b"")
        r.close()  # the client leaves before any content reached it
    receipt: dict[str, Any] = {}
    for _ in range(100):
        status, receipt = await gw.get(f"/v1/receipts/{request_id}", key)
        if status == 200:
            break
        await asyncio.sleep(0.1)
    assert receipt["status"] == "client_cancelled", receipt
    input_tokens = receipt["usage"]["prompt_tokens"]
    assert input_tokens >= len(prompt) // 4 and receipt["usage"]["completion_tokens"] == 0
    assert receipt["charge_nanos"] == gw.route_charge("gpt-4o-mini/official", input_tokens, 0) > 0
    entry = await gw.ledger_entry(key, receipt["ledger_entry_id"])
    assert entry["amount_nanos"] == -receipt["charge_nanos"]


async def test_what_a_translation_drops_is_named_in_the_receipt_and_a_header(gw: Gw) -> None:
    _, key = await gw.account(routed=FUNDS)
    status, body, headers = await gw.post("/v1/responses", key, {
        **CODEX_LIKE, "client_metadata": {"originator": "codex_exec"}, "route": "routed",
        "tools": [{"type": "web_search"}, {"type": "function", "name": "exec_command", "parameters": {
            "type": "object", "properties": {"cmd": {"type": "string"}}}}]})
    assert status == 200, body
    notes = body["receipt"]["notes"]
    assert body["receipt"]["relay"] == "translated"
    assert any(n.startswith("dropped: client_metadata") for n in notes), notes
    assert any(n.startswith("dropped: web_search") for n in notes), notes
    dropped = headers["x-tokensforge-dropped"].split(", ")
    assert {"client_metadata", "web_search", "prompt_cache_key"} <= set(dropped), dropped
    sent = (await gw.mock.stats())["last_request"]
    assert sent["path"] == "/v1/chat/completions" and [t["function"]["name"] for t in sent["body"]["tools"]] == [
        "exec_command"]
