"""The Vercel AI SDK (Node) against the gateway, unchanged: its OpenAI provider (Responses by default, Chat with
`openai.chat`) and its Anthropic provider (Messages), unary and streamed, native and translated. Its response
schemas are strict (an Anthropic answer with `"citations": null` fails to parse), so this is a compatibility
check of every dialect's answers; each request's receipt is checked against the ledger.

The SDK is installed at pinned versions by deploy/ensure-agents.sh (`make agents`) into .agents/."""

from __future__ import annotations

import asyncio
import os
import uuid

import orjson

from .agents import ensure_agents
from .harness import Gw

SCRIPT = """
import { createOpenAI } from "@ai-sdk/openai";
import { createAnthropic } from "@ai-sdk/anthropic";
import { generateText, streamText } from "ai";
const [base, key] = [process.env.TF_BASE, process.env.TF_KEY];
const openai = createOpenAI({ baseURL: base, apiKey: key });
const anthropic = createAnthropic({ baseURL: base, apiKey: key });
const models = {
  "responses/native": openai("gpt-5-mini"), "responses/translated": openai("claude-test"),
  "chat/native": openai.chat("gpt-4o-mini"), "chat/translated": openai.chat("claude-test"),
  "messages/native": anthropic("claude-test"), "messages/translated": anthropic("gpt-4o-mini"),
};
for (const [name, model] of Object.entries(models)) {
  const unary = await generateText({ model, prompt: "Say hello", maxOutputTokens: 30, maxRetries: 0 });
  const stream = streamText({ model, prompt: "Say hello", maxOutputTokens: 30, maxRetries: 0 });
  let streamed = "";
  for await (const delta of stream.textStream) streamed += delta;
  const headers = (await stream.response).headers ?? {};
  console.log(JSON.stringify({ name, text: unary.text, input: unary.usage.inputTokens,
    output: unary.usage.outputTokens, id: unary.response.headers?.["x-request-id"],
    streamed, streamId: headers["x-request-id"] }));
}
"""


async def test_the_vercel_ai_sdk_works_on_every_dialect_and_channel_kind(gw: Gw) -> None:
    bin_dir = await asyncio.to_thread(ensure_agents)
    _, key = await gw.account(credit=10**10, routed=10**10)
    script = bin_dir.parent.parent / "run" / f"vercel-{uuid.uuid4().hex}.mjs"  # resolves .agents/node_modules
    script.parent.mkdir(exist_ok=True)
    script.write_text(SCRIPT)
    try:
        proc = await asyncio.create_subprocess_exec(
            "node", str(script), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "TF_BASE": gw.url + "/v1", "TF_KEY": key, "NO_PROXY": "127.0.0.1"})
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    finally:
        script.unlink(missing_ok=True)
    assert proc.returncode == 0, err.decode()[-3000:]
    results = {r["name"]: r for r in map(orjson.loads, out.splitlines())}
    assert set(results) == {f"{api}/{mode}" for api in ("responses", "chat", "messages")
                            for mode in ("native", "translated")}
    for name, result in results.items():
        assert result["text"] and result["streamed"], name
        assert result["input"] > 0 and result["output"] > 0, name
        for request_id in (result["id"], result["streamId"]):
            assert request_id, f"{name}: no x-request-id"
            status, receipt = await gw.get(f"/v1/receipts/{request_id}", key)
            assert status == 200, receipt
            assert receipt["relay"] == name.split("/")[1], (name, receipt["relay"])
            await gw.assert_billed(key, receipt)

