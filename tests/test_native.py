"""Native first (SPEC §1): a channel that speaks the client's API gets the client's body as sent — only the
model, the output cap and the stream-usage switch rewritten — and its answer comes back as it was sent, with
the gateway's id, the model the client asked for and the receipt. Across dialects the canonical core
translates, and the receipt says which happened (`relay`)."""

from __future__ import annotations

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
