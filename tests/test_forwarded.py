"""Size what is forwarded (SPEC §1), unpriced fields, and the decoders' leniency toward real agents (pure)."""

from __future__ import annotations

import base64
import time
import zlib
from typing import Any

import orjson
import pytest

from tokensforge.canonical import Message, Request, TextPart, ToolCall, ToolResult
from tokensforge.dialects import anthropic_messages, openai_chat, openai_responses
from tokensforge.errors import InvalidRequest
from tokensforge.forwarded import (
    IMAGE_TOKENS, MAX_MEDIA_PARTS, MIN_PAGE_BYTES, PAGE_TOKENS, URL_DOCUMENT_PAGES, forwardable_beta,
    forwarded_input_tokens, pdf_pages, strip_unpriced, unpriced_fields,
)
from tokensforge.pricing import canonical_input_tokens, request_input_tokens
from tokensforge.upstream import anthropic as anthropic_upstream
from tokensforge.upstream import openai as openai_upstream

BIG = "x" * 540_000  # the 540 kB: the upstream bills ~135k-180k tokens for it
BIG_TOKENS = 540_000 // 3


def _pdf(pages: int, *, object_stream: bool = False, pad_bytes: int = 0) -> str:
    """A minimal PDF of `pages` page objects, as base64; with `object_stream`, the pages sit in a Flate
    object stream (as pdfTeX and most modern writers store them), invisible to a plain byte scan."""
    objects = b"".join(b"<< /Type /Page /Parent 2 0 R >>\n" for _ in range(pages))
    if object_stream:
        packed = zlib.compress(objects)
        body = (b"5 0 obj\n<< /Type /ObjStm /N %d /Filter /FlateDecode /Length %d >>\nstream\n" % (pages, len(packed))
                + packed + b"\nendstream\nendobj\n")
    else:
        body = objects
    tree = b"2 0 obj << /Type /Pages /Count %d >> endobj\n" % pages
    return base64.b64encode(b"%PDF-1.7\n" + tree + body + b"%" + b"." * pad_bytes + b"\n%%EOF\n").decode()


def chat(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": list(messages), **extra}


USER = {"role": "user", "content": "hi"}
TOOL_IMAGE = {"type": "image_url", "image_url": {"url": "https://x.test/i.png"}}

# ------------------------------------------------------------------ the hostile cases of issue #15
# Each: a body the old sizing (the canonical request alone) under-reserves, and the least a bound must hold.

HOSTILE: list[tuple[str, str, dict[str, Any], int]] = [
    ("legacy function_call.arguments", "chat",
     chat(USER, {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": BIG}}),
     BIG_TOKENS),
    ("assistant refusal", "chat", chat(USER, {"role": "assistant", "content": "no", "refusal": BIG}), BIG_TOKENS),
    ("reasoning_content", "chat",
     chat(USER, {"role": "assistant", "content": "ok", "reasoning_content": BIG}), BIG_TOKENS),
    ("an unknown top-level extension", "chat", chat(USER, extension={"prompt": BIG}), BIG_TOKENS),
    ("500 images in a tool message", "chat",
     chat(USER, {"role": "tool", "tool_call_id": "c", "content": [TOOL_IMAGE] * 100}), 100 * IMAGE_TOKENS),
    ("a 100-page PDF (chat file part)", "chat",
     chat({"role": "user", "content": [{"type": "file", "file": {
         "filename": "a.pdf", "file_data": "data:application/pdf;base64," + _pdf(100)}}]}), 100 * PAGE_TOKENS),
    ("a 100-page PDF (Responses input_file)", "responses",
     {"model": "m", "input": [{"role": "user", "content": [
         {"type": "input_file", "filename": "a.pdf", "file_data": "data:application/pdf;base64," + _pdf(100)}]}]},
     100 * PAGE_TOKENS),
    ("a 100-page PDF (Messages document)", "messages",
     {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": [
         {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": _pdf(100)}}]}]},
     100 * PAGE_TOKENS),
    ("a PDF whose pages hide in an object stream", "messages",
     {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": [
         {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                         "data": _pdf(60, object_stream=True)}}]}]},
     60 * PAGE_TOKENS),
    ("a document by URL", "messages",
     {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": [
         {"type": "document", "source": {"type": "url", "url": "https://x.test/a.pdf"}}]}]},
     URL_DOCUMENT_PAGES * PAGE_TOKENS),
    ("images inside Anthropic tool results", "messages",
     {"model": "m", "max_tokens": 10, "messages": [
         {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "read", "input": {}}]},
         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
             {"type": "image", "source": {"type": "url", "url": "https://x.test/i.png"}}] * 50}]}]},
     50 * IMAGE_TOKENS),
    ("thinking blocks and their signatures", "messages",
     {"model": "m", "max_tokens": 10, "messages": [USER, {"role": "assistant", "content": [
         {"type": "thinking", "thinking": BIG, "signature": "sig"}, {"type": "text", "text": "ok"}]}, USER]},
     BIG_TOKENS),
    ("Responses encrypted reasoning", "responses",
     {"model": "m", "input": [{"role": "user", "content": "hi"},
                              {"type": "reasoning", "summary": [], "encrypted_content": BIG}]}, BIG_TOKENS),
]


def _decode(api: str, body: dict[str, Any]) -> Request:
    if api == "chat":
        return openai_chat.decode(body)
    if api == "responses":
        return openai_responses.decode(body)
    return anthropic_messages.decode(body)


@pytest.mark.parametrize(("name", "api", "body", "least"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_bodies_are_reserved_for_what_is_forwarded(name: str, api: str, body: dict[str, Any],
                                                           least: int) -> None:
    req = _decode(api, body)
    assert forwarded_input_tokens(body, api) >= least
    assert request_input_tokens(req) >= least  # what size_request reserves for (the old code: the canonical
    # estimate with one 2,000-token allowance per document and no media in tool messages — 18 to 27 tokens
    # for the texts, 2,007 for a PDF: each case failed there)
    if "PDF" not in name and "document" not in name and "images" not in name:
        assert canonical_input_tokens(req) < least  # the canonical model is blind to these fields


def test_the_bound_is_tight_for_plain_text() -> None:
    """Every string at ceil(bytes / 3), 4 per message, 3 per request; role and type are structure."""
    body = chat({"role": "system", "content": "abc"}, {"role": "user", "content": [{"type": "text", "text": "déf"}]})
    assert forwarded_input_tokens(body, "chat") == 3 + 2 * 4 + -(-(3 + 4) // 3)
    assert forwarded_input_tokens(body, "chat") == canonical_input_tokens(openai_chat.decode(body))


def test_tool_schema_keys_count_but_model_does_not() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"properties": {"k" * 300: {}}}}}
    with_tool = forwarded_input_tokens(chat(USER, tools=[tool]), "chat")
    assert with_tool - forwarded_input_tokens(chat(USER), "chat") >= 100 + 400  # the key, the tool preamble
    assert forwarded_input_tokens({**chat(USER), "model": "m" * 3000}, "chat") == forwarded_input_tokens(
        chat(USER), "chat")


def test_long_role_values_are_counted() -> None:
    """A short role is structure; a long one is text an upstream might read."""
    assert forwarded_input_tokens(chat({"role": "u" * 3000, "content": "x"}), "chat") >= 1000


def test_base64_payloads_are_not_text_and_low_detail_is_cheap() -> None:
    data = "data:image/png;base64," + "A" * 3_000_000
    high = chat({"role": "user", "content": [{"type": "image_url", "image_url": {"url": data}}]})
    low = chat({"role": "user", "content": [{"type": "image_url", "image_url": {"url": data, "detail": "low"}}]})
    assert forwarded_input_tokens(high, "chat") < IMAGE_TOKENS + 50
    assert forwarded_input_tokens(low, "chat") < 85 + 50


def test_plain_text_documents_count_their_text() -> None:
    text = "y" * 30_000
    body = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": text}},
        {"type": "document", "source": {"type": "base64", "media_type": "text/plain",
                                        "data": base64.b64encode(text.encode()).decode()}}]}]}
    tokens = forwarded_input_tokens(body, "messages")
    assert 2 * 10_000 <= tokens < 2 * 10_000 + 50


def test_media_anywhere_counts_toward_the_limit() -> None:
    body = chat(USER, {"role": "tool", "tool_call_id": "c", "content": [TOOL_IMAGE] * (MAX_MEDIA_PARTS + 1)})
    with pytest.raises(InvalidRequest):
        forwarded_input_tokens(body, "chat")
    with pytest.raises(InvalidRequest):
        request_input_tokens(openai_chat.decode(body))


@pytest.mark.parametrize(("pdf", "pages"), [
    (_pdf(1), 1),
    (_pdf(7), 7),
    (_pdf(40, object_stream=True), 40),
])
def test_pdf_pages_are_read(pdf: str, pages: int) -> None:
    assert pdf_pages(base64.b64decode(pdf)) == pages


def test_pdf_pages_fall_back_to_size_when_unreadable() -> None:
    raw = b"%PDF-1.7\n" + b"0" * (10 * MIN_PAGE_BYTES)  # no page object anywhere: pages from size
    assert pdf_pages(raw) >= 10
    hidden = b"%PDF-1.7\n<< /Type /Page >>\n5 0 obj << /Type /ObjStm /Filter /LZWDecode >>\nstream\n" + (
        b"\x00" * 20 * MIN_PAGE_BYTES) + b"\nendstream"
    assert pdf_pages(hidden) >= 20  # an object stream it cannot read: a page may hide there


def test_sizing_is_fast_and_linear() -> None:
    small = chat({"role": "system", "content": "You are helpful."}, USER)
    started = time.perf_counter()
    for _ in range(2000):
        forwarded_input_tokens(small, "chat")
    assert (time.perf_counter() - started) / 2000 < 100e-6  # generous for a shared CI machine
    deep: Any = "x"
    for _ in range(5000):  # deeper than Python's recursion limit: the walk is iterative
        deep = [deep]
    assert forwarded_input_tokens(chat(USER, extension=deep), "chat") >= 1


# ------------------------------------------------------------------ unpriced fields


@pytest.mark.parametrize(("body", "api", "headers", "refused", "dropped"), [
    (chat(USER, models=["a", "b"], provider={"order": ["x"]}), "chat", {}, ["models", "provider"], []),
    (chat(USER, plugins=[{"id": "web"}]), "chat", {}, ["plugins"], []),
    (chat(USER, best_of=3), "chat", {}, ["best_of"], []),
    (chat(USER, best_of=1), "chat", {}, [], []),
    ({"model": "m", "input": "hi", "tools": [{"type": "web_search"}, {"type": "function", "name": "f"},
                                              {"type": "code_interpreter", "container": {"type": "auto"}}]},
     "responses", {}, [], ["tools:web_search", "tools:code_interpreter"]),
    ({"model": "m", "messages": [USER], "tools": [{"type": "web_search_20250305", "name": "web_search"},
                                                    {"type": "web_fetch_20250910", "name": "web_fetch"},
                                                    {"type": "bash_20250124", "name": "bash"}]},
     "messages", {"Anthropic-Beta": "claude-code-20250219, context-1m-2025-08-07"}, [],
     ["tools:web_search_20250305", "tools:web_fetch_20250910", "anthropic-beta:context-1m-2025-08-07"]),
    ({"model": "m", "messages": [USER], "mcp_servers": [{"type": "url", "url": "https://x"}]}, "messages", {}, [],
     ["mcp_servers"]),
])
def test_unpriced_fields(body: dict[str, Any], api: str, headers: dict[str, str], refused: list[str],
                         dropped: list[str]) -> None:
    assert unpriced_fields(body, api, headers) == (refused, dropped)


def test_strip_unpriced_refuses_naming_every_field() -> None:
    with pytest.raises(InvalidRequest) as caught:
        strip_unpriced(chat(USER, provider={"order": ["x"]}, best_of=2), "chat")
    assert caught.value.param == "provider" and "'best_of'" in caught.value.message


def test_strip_unpriced_removes_hosted_tools_and_pricing_betas_with_notes() -> None:
    body = {"model": "m", "input": "hi", "tools": [{"type": "web_search"}], "tool_choice": "auto"}
    out = strip_unpriced(body, "responses")
    assert "tools" not in out.body and "tool_choice" not in out.body and body["tools"]  # the client's is intact
    assert out.notes == ["dropped: web_search (hosted tool, not priced)"]
    out = strip_unpriced({"model": "m", "messages": [USER]}, "messages",
                         {"anthropic-beta": "context-1m-2025-08-07,interleaved-thinking-2025-05-14"})
    assert out.beta == "interleaved-thinking-2025-05-14"
    assert out.notes == ["dropped: anthropic-beta context-1m-2025-08-07 (changes the price)"]
    assert forwardable_beta({"anthropic-beta": "context-1m-2025-08-07"}) is None


# ------------------------------------------------------------------ real agents' requests, decoded leniently

SCHEMA = {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}
#: the shape of a Claude Code turn (claude -p, a tool round trip), as Anthropic's Messages docs describe it
CLAUDE_CODE = {
    "model": "claude-sonnet-4-20250514",
    "max_tokens": 32000,
    "system": [
        {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.",
         "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "You are an interactive CLI tool that helps users with software engineering tasks.",
         "cache_control": {"type": "ephemeral"}},
    ],
    "messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>This is a reminder.</system-reminder>"},
            {"type": "text", "text": "List the files", "cache_control": {"type": "ephemeral"}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "I should run ls.", "signature": "EqQBCkYIBxgCKkB"},
            {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix"},
            {"type": "tool_use", "id": "toolu_01", "name": "Bash", "input": {"command": "ls"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01", "content": [
                {"type": "text", "text": "a.py\nshot.png"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}],
             "cache_control": {"type": "ephemeral"}}]},
        {"role": "system", "content": "The user switched to plan mode."},
    ],
    "tools": [{"name": "Bash", "description": "Run a command", "input_schema": SCHEMA,
               "cache_control": {"type": "ephemeral"}},
              {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"},
              {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}],
    "tool_choice": {"type": "auto"},
    "metadata": {"user_id": "user_3f2a_account__session_9c1e"},
    "temperature": 1,
    "stream": True,
    "thinking": {"type": "enabled", "budget_tokens": 31999},
    "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    "output_config": {"effort": "high"},
}
CLAUDE_BETAS = {"anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,"
                                  "context-management-2025-06-27,context-1m-2025-08-07"}


def test_claude_code_request_is_served_and_translated_with_notes() -> None:
    req = anthropic_messages.decode(CLAUDE_CODE, CLAUDE_BETAS)
    assert req.notes == ["dropped: web_search_20250305 (server tool, not priced)",
                         "dropped: anthropic-beta context-1m-2025-08-07 (changes the price)"]
    assert req.raw is not None and [t["name"] for t in req.raw["tools"]] == ["Bash", "str_replace_based_edit_tool"]
    assert CLAUDE_CODE["tools"][2]["name"] == "web_search"  # the client's body is not edited in place
    assert [t.name for t in req.tools] == ["Bash"]
    assert req.user == "user_3f2a_account__session_9c1e" and req.max_output_tokens == 32000
    assert [m.role for m in req.messages] == ["system", "user", "assistant", "tool", "user", "system"]
    assert req.messages[3] == Message("tool", (ToolResult("toolu_01", "a.py\nshot.png"),))
    assert req.messages[2].parts == (ToolCall("toolu_01", "Bash", '{"command":"ls"}'),)
    assert set(req.untranslatable) == {"thinking", "context_management", "output_config", "thinking blocks",
                                       "tool str_replace_based_edit_tool (text_editor_20250728)"}
    body = orjson.loads(openai_upstream.build(req, "gpt-4o-mini"))
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "tool", "user", "system"]
    assert {"dropped: thinking", "dropped: thinking blocks", "dropped: context_management"} <= set(req.notes)
    assert forwardable_beta(CLAUDE_BETAS) == ("claude-code-20250219,interleaved-thinking-2025-05-14,"
                                              "context-management-2025-06-27").replace(",", ", ")


def test_claude_code_request_to_an_anthropic_channel_notes_what_translation_loses() -> None:
    req = anthropic_messages.decode({**CLAUDE_CODE, "stream": False})
    body = orjson.loads(anthropic_upstream.build(req, "claude-up"))
    assert "The user switched to plan mode." in body["system"]
    assert body["messages"][-1]["content"][-1]["type"] == "image"  # the tool result's image follows it
    assert "dropped: output_config" in req.notes


#: the shape of a Codex CLI turn (`codex exec`, wire_api = "responses"), as its requests are sent
CODEX = {
    "model": "gpt-5-codex",
    "instructions": "You are Codex, based on GPT-5. You are running as a coding agent in the Codex CLI.",
    "input": [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "<permissions/>"}]},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "<environment_context><cwd>/w</cwd></environment_context>"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "list the files"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Run ls."}],
         "encrypted_content": "gAAAAABo_encrypted"},
        {"type": "function_call", "name": "shell", "arguments": "{\"command\":[\"ls\"]}", "call_id": "call_1"},
        {"type": "function_call_output", "call_id": "call_1", "output": "a.py\n"},
        {"type": "custom_tool_call", "call_id": "call_2", "name": "apply_patch", "input": "*** Begin Patch"},
        {"type": "custom_tool_call_output", "call_id": "call_2", "output": "Done"},
    ],
    "tools": [
        {"type": "function", "name": "shell", "description": "Runs a shell command", "strict": False,
         "parameters": SCHEMA},
        {"type": "namespace", "name": "collaboration", "description": "Agents", "tools": [
            {"type": "function", "name": "spawn_agent", "description": "Spawns an agent.",
             "parameters": {"type": "object", "properties": {"message": {"type": "string"}}}}]},
        {"type": "web_search"},
        {"type": "custom", "name": "apply_patch", "description": "Edit files",
         "format": {"type": "grammar", "syntax": "lark", "definition": "start: begin_patch"}},
    ],
    "tool_choice": "auto",
    "parallel_tool_calls": False,
    "reasoning": {"effort": "medium", "summary": "auto"},
    "store": False,
    "stream": True,
    "include": ["reasoning.encrypted_content"],
    "prompt_cache_key": "0199a3c2-5b1e-7c1a-9f1e-2d3c4b5a6978",
    "text": {"verbosity": "medium"},
    "client_metadata": {"x-codex-installation-id": "abc"},
}


def test_codex_request_is_served_and_translated_with_notes() -> None:
    req = openai_responses.decode(CODEX)
    assert req.notes == ["dropped: web_search (hosted tool, not priced)"]
    assert [t.name for t in req.tools] == ["shell", "spawn_agent"]
    assert req.raw is not None and [t["type"] for t in req.raw["tools"]] == ["function", "namespace", "custom"]
    assert set(req.untranslatable) == {"include", "prompt_cache_key", "client_metadata", "text.verbosity",
                                       "reasoning items", "custom_tool_call items", "custom_tool_call_output items",
                                       "tool apply_patch (custom)"}
    assert req.messages[-1] == Message("tool", (ToolResult("call_1", "a.py\n"),))
    body = orjson.loads(openai_upstream.build(req, "gpt-4o-mini"))
    assert [t["function"]["name"] for t in body["tools"]] == ["shell", "spawn_agent"]
    assert "client_metadata" not in body and "prompt_cache_key" not in body
    assert {"dropped: client_metadata", "dropped: reasoning items", "dropped: tool apply_patch (custom)"} <= set(
        req.notes)


def test_a_chat_body_is_forwarded_raw_only_to_chat() -> None:
    """`Request.raw` now holds every dialect's body: only a chat client's is forwarded to chat as sent."""
    chat_req = openai_chat.decode(chat(USER, extension={"k": "v"}))
    assert orjson.loads(openai_upstream.build(chat_req, "up"))["extension"] == {"k": "v"}
    assert chat_req.untranslatable == ["extension"] and chat_req.notes == []
    responses_req = openai_responses.decode({"model": "m", "input": "hi", "client_metadata": {"a": "b"}})
    assert "input" not in orjson.loads(openai_upstream.build(responses_req, "up"))
    assert responses_req.notes == ["dropped: client_metadata"]


def test_chat_decoder_carries_sampling_fields_and_inline_files() -> None:
    req = openai_chat.decode(chat(USER, temperature=0.3, top_p=0.5, stop="END", user="u", parallel_tool_calls=False,
                                  reasoning_effort="low"))
    assert (req.temperature, req.top_p, req.stop, req.user, req.parallel_tool_calls, req.reasoning) == (
        0.3, 0.5, ("END",), "u", False, {"effort": "low"})
    pdf = "data:application/pdf;base64," + _pdf(3)
    req = openai_chat.decode(chat({"role": "user", "content": [{"type": "file", "file": {"file_data": pdf}}]}))
    body = orjson.loads(anthropic_upstream.build(req.__class__(**{**_fields(req), "max_output_tokens": 5}), "up"))
    assert body["messages"][0]["content"][0]["type"] == "document"
    with pytest.raises(InvalidRequest):
        openai_chat.decode(chat({"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}))


def _fields(req: Request) -> dict[str, Any]:
    return {name: getattr(req, name) for name in req.__dataclass_fields__}


def test_messages_answers_never_carry_null_citations() -> None:
    from tokensforge.canonical import Choice, Response, Usage
    req = anthropic_messages.decode({"model": "m", "max_tokens": 5, "messages": [USER]})
    out = anthropic_messages.encode_response(Response("m", [Choice(0, "hi")], Usage(1, 1)), message_id="msg_1",
                                             request=req, usage=Usage(1, 1), receipt={})
    assert out["content"] == [{"type": "text", "text": "hi"}]
    assert TextPart("x") == TextPart("x")
