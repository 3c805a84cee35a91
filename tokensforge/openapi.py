"""The OpenAPI 3.1 document of the public HTTP API (SPEC §2), as plain data.

`GET /openapi.json` serves it (api/openapi.py); tests/test_openapi.py keeps it
true: every routed path is documented and vice versa, the document validates
as OpenAPI 3.1, and real answers validate against their response schemas;
tests/test_fuzz.py fuzzes the running gateway with schemathesis against it.

Two vendor extensions on operations:
- `x-tokensforge-planned: true`: in SPEC §2 but not routed yet (being built);
  tests skip it until the app routes it.
- `x-tokensforge-error-shape: anthropic`: errors in Anthropic's shape
  (`{"type": "error", "error": {"type", "message"}}`), not OpenAI's.
"""

from __future__ import annotations

from typing import Any

JSON = "application/json"
Schema = dict[str, Any]

# ---------------------------------------------------------------- small builders


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(required: list[str] | None = None, /, **properties: Schema) -> Schema:
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


STR: Schema = {"type": "string"}
INT: Schema = {"type": "integer"}
NANOS: Schema = {"type": "integer", "description": "nano-USD (1 USD = 1,000,000,000)"}
USD: Schema = {"type": "string", "pattern": r"^-?\d+\.\d{9}$", "description": "the *_nanos twin, in USD"}
BOOL: Schema = {"type": "boolean"}
TIME: Schema = {"type": "string", "format": "date-time"}
PRICE: Schema = {"type": "string", "pattern": r"^\d+(\.\d+)?$", "description": "USD per 1M tokens, exact decimal"}
#: text bound for PostgreSQL, which cannot hold NUL: refused with a 400 (api/common.py check_text)
NO_NUL: Schema = {"type": "string", "pattern": "^[^\\x00]*$"}
#: a required name or key: not empty, not only spaces, no NUL (api/common.py require_str)
NAME: Schema = {"type": "string", "minLength": 1, "pattern": "^[^\\x00]*[^\\s\\x00][^\\x00]*$"}
#: a model id in a request: "" names no model (400 or 404)
MODEL: Schema = {"type": "string", "minLength": 1}


def body(schema: Schema, *, required: bool = True) -> Schema:
    return {"required": required, "content": {JSON: {"schema": schema}}}


def ok(schema: Schema, description: str = "OK", *, stream: bool = False, headers: list[str] | None = None) -> Schema:
    content: Schema = {JSON: {"schema": schema}}
    if stream:
        content["text/event-stream"] = {"schema": ref("ServerSentEvent")}
    out: Schema = {"description": description, "content": content, "headers": _headers(["RequestId"] + (headers or []))}
    return out


def _headers(names: list[str]) -> Schema:
    return {h.lower().replace("_", "-"): {"$ref": f"#/components/headers/{h}"} for h in names}


def errors(*statuses: int, anthropic: bool = False) -> dict[str, Schema]:
    prefix = "Anthropic" if anthropic else ""
    return {str(s): {"$ref": f"#/components/responses/{prefix}Error{s}"} for s in statuses}


def op(summary: str, responses: dict[str, Schema], *, tag: str, security: str | None = "ApiKey",
       request: Schema | None = None, params: list[Schema] | None = None, op_id: str,
       planned: bool = False, anthropic: bool = False) -> Schema:
    out: Schema = {"operationId": op_id, "summary": summary, "tags": [tag], "responses": responses}
    out["security"] = [{security: []}] if security else []
    if anthropic:  # Anthropic clients send the key as x-api-key
        out["security"] = [{"AnthropicApiKey": []}, *out["security"]]
        out["x-tokensforge-error-shape"] = "anthropic"
    if planned:
        out["x-tokensforge-planned"] = True
    if request is not None:
        out["requestBody"] = request
    if params:
        out["parameters"] = params
        if any(p.get("in") == "path" for p in params) and "400" not in responses:
            # an id no row can have (a NUL character) is refused as bad input
            responses["400"] = errors(400, anthropic=anthropic)["400"]
    return out


def path_param(name: str, description: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": STR}


def query(name: str, schema: Schema, description: str) -> Schema:
    if schema.get("type") == "string" and "pattern" not in schema:
        schema = {**schema, **NO_NUL}  # a NUL in a query string is a 400 (check_text), whatever the parameter
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


LIMIT = query("limit", {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}, "page size")
AFTER = query("after", {"type": "string", "pattern": r"^\d{0,18}$"},
              "next_cursor of the previous page (empty: the first page)")
ROUTE_HEADER: Schema = {"name": "x-tokensforge-route", "in": "header", "required": False, "schema": STR,
                        "description": "pin a route: route id or route kind (SPEC §1)"}

# Statuses every endpoint group can answer (SPEC §2). 413: bodies above max_body_bytes;
# 503 ledger_unavailable: the database is unreachable.
CLIENT_READ = (401, 503)
CLIENT_WRITE = (400, 401, 413, 503)
PROXIED = (400, 401, 402, 403, 404, 413, 429, 502, 503, 504)
ADMIN = (401, 403, 503)

# ---------------------------------------------------------------- schemas

ERROR_CODES = ["invalid_request", "invalid_api_key", "insufficient_balance", "model_not_allowed",
               "route_not_allowed", "budget_exceeded", "permission_denied", "admin_disabled", "model_not_found",
               "not_found", "request_too_large", "rate_limited", "idempotency_conflict", "upstream_error",
               "no_healthy_channel", "ledger_unavailable", "upstream_timeout", "internal_error"]

# ---------------------------------------------------------------- webhooks (SPEC §2 "Webhooks")

EVENT_TYPE: Schema = {"enum": ["balance.low", "budget.threshold", "pool.granted", "pool.expired"]}
WEBHOOK_SCHEMAS: dict[str, Schema] = {
    "WebhookRequest": {
        **obj(["url", "events"],
              url={"type": "string", "minLength": 1, "maxLength": 2048,
                   "pattern": "^https?://[^\\s\\x00/?#]+([/?#][^\\s\\x00]*)?$"},
              events={**array(EVENT_TYPE), "minItems": 1},
              thresholds={"type": "object", "description": "bucket → nano-USD: balance.low fires when the "
                                                           "bucket's available amount falls below it",
                          "additionalProperties": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}}),
        # balance.low needs a threshold to fall below
        "if": {"properties": {"events": {"contains": {"const": "balance.low"}}}, "required": ["events"]},
        "then": {"required": ["thresholds"], "properties": {"thresholds": {"minProperties": 1}}},
    },
    "Webhook": obj(["id", "object", "account_id", "url", "events", "thresholds", "created_at"],
                   id=STR, object={"const": "webhook"}, account_id=STR, url=STR, events=array(EVENT_TYPE),
                   thresholds={"type": "object", "additionalProperties": INT}, created_at=TIME,
                   pending_events=INT),
    "WebhookCreated": {"allOf": [ref("Webhook"), obj(["secret"], secret={
        **STR, "description": "signs every delivery (HMAC-SHA256 key: its UTF-8 bytes); returned only here"})]},
    "WebhookList": obj(["object", "data", "has_more", "next_cursor"], object={"const": "list"},
                       data=array(ref("Webhook")), has_more=BOOL, next_cursor=nullable(STR)),
    "WebhookDeleted": obj(["id", "object", "deleted"], id=STR, object={"const": "webhook"}, deleted=BOOL),
    "WebhookDelivery": obj(
        ["id", "object", "event_id", "type", "attempt", "status_code", "ok", "error", "duration_ms", "event_status",
         "created_at"],
        id=STR, object={"const": "webhook.delivery"}, event_id=STR, type=EVENT_TYPE, attempt=INT,
        status_code=nullable(INT), ok=BOOL, error=nullable(STR), duration_ms=INT,
        event_status={"enum": ["pending", "delivered", "failed", "cancelled"]}, created_at=TIME),
    "WebhookDeliveryList": obj(["object", "data", "has_more", "next_cursor"], object={"const": "list"},
                               data=array(ref("WebhookDelivery")), has_more=BOOL, next_cursor=nullable(STR)),
}


SCHEMAS: dict[str, Schema] = {
    "Error": obj(
        ["error"],
        error=obj(["message", "type", "code", "param"],
                  message=STR, type=STR, code={"type": "string", "examples": ERROR_CODES},
                  param=nullable(STR),
                  bucket={**STR, "description": "402: the bucket that cannot pay"},
                  needed_nanos=NANOS, available_nanos=NANOS,
                  route=nullable({**STR, "description": "403 route_not_allowed: the route"})),
    ),
    "AnthropicError": obj(["type", "error"], type={"const": "error"},
                          error=obj(["type", "message"], type=STR, message=STR)),
    "TokenUsage": obj(["prompt_tokens", "completion_tokens", "total_tokens"],
                      prompt_tokens={**INT, "description": "all input: fresh + cache reads + cache writes"},
                      completion_tokens={**INT, "description": "all output, reasoning included"},
                      total_tokens=INT, cache_read_tokens=INT,
                      cache_write_tokens={**INT, "description": "5-minute cache writes"},
                      cache_write_1h_tokens=INT,
                      reasoning_tokens={**INT, "description": "part of completion_tokens"}),
    "CostLine": obj(["class", "tokens", "per_mtok", "nanos"],
                    **{"class": {"enum": ["input", "cache_read", "cache_write", "cache_write_1h", "output"],
                                 "description": "input = fresh input"}},
                    tokens=INT, per_mtok=PRICE,
                    nanos={**NANOS, "description": "tokens × per_mtok; exact unless exact_nanos is given"},
                    exact_nanos={"type": "string", "pattern": r"^\d+\.\d+$",
                                 "description": "the line's exact amount when it has a fraction of a nano-USD "
                                                "(prices of more than three decimals); price_nanos rounds the "
                                                "exact sum of the lines once"}),
    "CachedTurnExample": obj(
        ["input_tokens", "cache_read_tokens", "output_tokens", "price_nanos", "uncached_price_nanos"],
        input_tokens=INT, cache_read_tokens=INT, output_tokens=INT, price_nanos=NANOS, price_usd=USD,
        uncached_price_nanos={**NANOS, "description": "the same tokens with every input token at the input price"},
        uncached_price_usd=USD),
    "RouteRef": obj(["id", "kind"], id=STR, kind=STR),
    "Price": obj(["input_per_mtok", "output_per_mtok", "cache_read_per_mtok", "cache_write_per_mtok",
                  "cache_write_1h_per_mtok", "rounding"], input_per_mtok=PRICE, output_per_mtok=PRICE,
                 cache_read_per_mtok=PRICE, cache_write_per_mtok=PRICE, cache_write_1h_per_mtok=PRICE,
                 rounding={"const": "half_up_nano"}),
    "ChannelChain": obj(["primary", "backups"], primary=STR, backups=array(STR)),
    "RetryPolicy": obj(["max_attempts", "retry_on", "backoff_ms"], max_attempts=INT, retry_on=array(STR),
                       backoff_ms=INT),
    "Attempt": obj(["channel", "outcome", "status", "latency_ms"], channel=STR,
                   outcome={"enum": ["ok", "timeout", "connect", "5xx", "429", "4xx", "malformed", "stream_cut",
                                     "skipped"]},
                   status=nullable(INT), latency_ms=INT, route=STR, skipped=STR),
    "Receipt": obj(
        ["request_id", "status", "selected_model", "upstream_model", "route", "bucket", "price", "account_id",
         "project_id", "key_id", "channels", "attempts", "fallback", "on_failure", "usage", "reserved_nanos",
         "charge_nanos", "charge_usd", "ledger_entry_id", "balance_after_nanos"],
        object={"const": "receipt"},
        request_id=STR,
        status={"enum": ["succeeded", "failed", "client_cancelled"]},
        endpoint=STR,
        selected_model=nullable(STR), upstream_model=nullable(STR),
        route=nullable(ref("RouteRef")), bucket=nullable(STR), price=nullable(ref("Price")),
        account_id=STR, project_id=nullable(STR), key_id=STR,
        channels=nullable(obj(["primary", "backups", "served_by"], primary=STR, backups=array(STR),
                              served_by=nullable(STR))),
        attempts=array(ref("Attempt")),
        fallback=obj(["used", "cross_route", "from_route"], used=BOOL, cross_route=BOOL, from_route=nullable(STR)),
        on_failure=nullable({"enum": ["free", "charge_delivered"]}),
        usage=nullable(ref("TokenUsage")),
        usage_source=nullable({"enum": ["upstream", "estimated"]}),
        cost_lines={**array(ref("CostLine")), "description": "one line per token class billed; empty when "
                    "nothing was"},
        reserved_nanos=NANOS, charge_nanos=NANOS, charge_usd=USD,
        price_nanos={**NANOS, "description": "the price of the tokens served; above charge_nanos when capped"},
        ledger_entry_id={**nullable(STR), "description": "null exactly when charge_nanos is 0"},
        balance_after_nanos=nullable(NANOS),
        latency_ms=nullable(INT),
        error=obj(["code", "message"], code=STR, message=STR),
    ),
    "UsageRecord": {"allOf": [ref("Receipt"), obj(["created_at", "latency_ms"], created_at=TIME,
                                                   latency_ms=nullable(INT))]},
    "UsageList": obj(["object", "data", "has_more", "next_cursor"], object={"const": "list"},
                     data=array(ref("UsageRecord")), has_more=BOOL, next_cursor=nullable(STR)),
    "LedgerEntry": obj(
        ["id", "account_id", "bucket", "kind", "amount_nanos", "balance_after_nanos", "request_id",
         "idempotency_key", "note", "created_at"],
        id=STR, account_id=STR, bucket=STR,
        kind={"enum": ["topup", "charge", "refund", "adjustment", "grant", "expiry"]},
        amount_nanos={**NANOS, "description": "signed: a top-up is positive, a charge negative"},
        amount_usd=USD, balance_after_nanos=NANOS, balance_after_usd=USD,
        request_id=nullable(STR), idempotency_key=nullable(STR), note=nullable(STR), created_at=TIME,
    ),
    "LedgerList": obj(["object", "data", "has_more", "next_cursor"], object={"const": "list"},
                      data=array(ref("LedgerEntry")), has_more=BOOL, next_cursor=nullable(STR)),
    "Bucket": obj(["bucket", "name", "balance_nanos", "reserved_nanos", "available_nanos"],
                  bucket=STR, name=STR, balance_nanos=NANOS, reserved_nanos=NANOS, available_nanos=NANOS,
                  balance_usd=USD, reserved_usd=USD, available_usd=USD, kind={"enum": ["prepaid", "pool"]},
                  pool=nullable(ref("Pool"))),
    "Pool": obj(["period", "period_start", "period_end", "allowance_nanos", "used_nanos", "lapses_nanos",
                 "lapses_at"],
                plan=nullable(STR), period={"enum": ["day", "month"]}, period_start=STR, period_end=STR,
                allowance_nanos=NANOS, used_nanos=NANOS, lapses_nanos=NANOS, lapses_usd=USD, lapses_at=STR),
    "UsageSummary": obj(
        ["object", "window", "bucket_size_s", "series", "top_models", "top_routes", "typical"],
        object={"const": "usage.summary"}, window={"enum": ["24h", "30d"]}, bucket_size_s=INT,
        series=array(obj(["bucket", "points"], bucket=STR, total_nanos=NANOS,
                         points=array(obj(["t", "charge_nanos"], t=STR, charge_nanos=NANOS)))),
        top_models=array(obj(["model", "charge_nanos", "requests"], model=STR, charge_nanos=NANOS, requests=INT)),
        top_routes=array(obj(["route_id", "route_kind", "charge_nanos", "requests"], route_id=STR,
                             route_kind=STR, charge_nanos=NANOS, requests=INT)),
        typical={"type": "object"}),
    "Balance": obj(["buckets"], object={"const": "balance"}, account_id=STR, buckets=array(ref("Bucket"))),
    "ModelRoute": obj(
        ["id", "kind", "bucket", "input_price_per_mtok", "output_price_per_mtok", "cache_read_price_per_mtok",
         "cache_write_price_per_mtok", "cache_write_1h_price_per_mtok", "channels", "on_failure", "healthy"],
        id=STR, kind=STR, bucket=STR, input_price_per_mtok=PRICE, output_price_per_mtok=PRICE,
        cache_read_price_per_mtok=PRICE, cache_write_price_per_mtok=PRICE, cache_write_1h_price_per_mtok=PRICE,
        cache_classes_at_input_price={**array({"enum": ["cache_read", "cache_write", "cache_write_1h"]}),
                                      "description": "cache classes the catalog does not price here: each costs "
                                                     "the input price"},
        cached_turn_example=ref("CachedTurnExample"),
        channels=ref("ChannelChain"), upstream_models={"type": "object", "additionalProperties": STR},
        retry=ref("RetryPolicy"), on_failure={"enum": ["free", "charge_delivered"]}, healthy=BOOL),
    "Model": obj(["id", "object", "created", "owned_by", "routes"], id=STR, object={"const": "model"},
                 created=INT, owned_by=STR, type={"enum": ["chat", "embedding"]}, max_output_tokens=INT,
                 routes=array(ref("ModelRoute"))),
    "ModelList": obj(["object", "data"], object={"const": "list"}, data=array(ref("Model"))),
    "ChatMessage": {"type": "object", "required": ["role"],
                    "properties": {"role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
                                   "content": {"anyOf": [STR, array({"type": "object"}), {"type": "null"}]},
                                   "name": STR, "tool_call_id": STR, "tool_calls": array({"type": "object"})}},
    "ChatCompletionRequest": {
        "type": "object", "required": ["model", "messages"],
        "description": "OpenAI chat completions; unknown fields are forwarded to the upstream.",
        "properties": {
            "model": MODEL, "messages": {**array(ref("ChatMessage")), "minItems": 1},
            "stream": BOOL, "stream_options": obj(include_usage=BOOL),
            "max_tokens": {"type": "integer", "minimum": 1}, "max_completion_tokens": {"type": "integer", "minimum": 1},
            "n": {"type": "integer", "minimum": 1}, "temperature": {"type": "number"},
            "tools": array({"type": "object"}), "tool_choice": {"anyOf": [STR, {"type": "object"}]},
            "route": {**STR, "description": "pin a route: route id or route kind (not forwarded)"},
        },
    },
    "ChatCompletion": {
        "type": "object", "required": ["choices", "receipt"],
        "properties": {"id": STR, "object": STR, "created": INT, "model": STR,
                       "choices": array({"type": "object"}), "usage": nullable({"type": "object"}),
                       "receipt": ref("Receipt")},
    },
    "EmbeddingRequest": {
        "type": "object", "required": ["model", "input"],
        "properties": {"model": MODEL,
                       "input": {"anyOf": [STR, array(STR), array(INT), array(array(INT))]},
                       "encoding_format": {"enum": ["float", "base64"]}, "dimensions": {"type": "integer"},
                       "user": STR, "route": STR},
    },
    "EmbeddingResponse": {
        "type": "object", "required": ["data", "receipt"],
        "properties": {"object": {"const": "list"}, "model": STR,
                       "data": array(obj(["embedding"], object=STR, index=INT,
                                         embedding={"anyOf": [array({"type": "number"}), STR]})),
                       "usage": {"type": "object"}, "receipt": ref("Receipt")},
    },
    "Quote": obj(
        ["object", "model", "allowed", "reason", "route"],
        object={"const": "quote"}, model=STR, allowed=BOOL, reason=nullable(STR), code=nullable(STR),
        route=nullable(ref("RouteRef")), bucket=STR, bucket_name=STR, price=ref("Price"),
        cached_turn_example=ref("CachedTurnExample"), channels=ref("ChannelChain"), healthy=BOOL,
        retry=ref("RetryPolicy"),
        on_failure={"enum": ["free", "charge_delivered"]}, allow_cross_route_fallback=BOOL,
        estimated_input_tokens=INT, max_output_tokens=INT, reserve_nanos=NANOS, reserve_usd=USD,
        available_nanos=NANOS, available_usd=USD, bucket_kind={"enum": ["prepaid", "pool"]},
        pool=nullable(ref("Pool"))),
    # ---------------------------------------------------------------- admin
    "Policy": {
        "type": "object", "additionalProperties": False,
        "description": "Omitted fields: every model, route kind and bucket; route_preference official; "
                       "no cross-route fallback; no budget; no rate limit.",
        "properties": {
            "allowed_models": array(MODEL), "allowed_route_kinds": array(MODEL), "allowed_buckets": array(MODEL),
            "route_preference": {"anyOf": [{"enum": ["official", "cheapest"]}, {**array(MODEL), "minItems": 1}]},
            "allow_cross_route_fallback": BOOL,
            "budget_nanos": {"type": "integer", "minimum": 1}, "budget_period": {"enum": ["day", "month", "total"]},
            "rpm": {"type": "integer", "minimum": 1}, "tpm": {"type": "integer", "minimum": 1},
        },
    },
    "Project": obj(["object", "id", "account_id", "name", "policy", "created_at"], object={"const": "project"},
                   id=STR, account_id=STR, name=STR, policy={"type": "object"}, created_at=TIME),
    "ApiKey": obj(["object", "id", "account_id", "project_id", "name", "policy", "prefix", "revoked"],
                  object={"const": "api_key"}, id=STR, account_id=STR, project_id=nullable(STR), name=STR,
                  policy={"type": "object"}, prefix=STR, revoked=BOOL, revoked_at=nullable(TIME),
                  created_at=TIME),
    "ApiKeyCreated": {"allOf": [ref("ApiKey"), obj(["key"], key={
        **STR, "description": "the plaintext key (tf-…): returned only here, stored only as a hash"})]},
    "Account": obj(["object", "id", "name", "created_at", "buckets"], object={"const": "account"}, id=STR,
                   name=STR, created_at=TIME, buckets=array(ref("Bucket")),
                   projects=array(ref("Project")), keys=array(ref("ApiKey"))),
    "TopupRequest": obj(["bucket", "amount_nanos", "idempotency_key"], bucket=NAME,
                        amount_nanos={"type": "integer", "minimum": 1, "maximum": 10**18},
                        idempotency_key=NAME, note=nullable(NO_NUL)),
    "Topup": {"allOf": [ref("LedgerEntry"), obj(["replayed"], replayed={
        **BOOL, "description": "true: this idempotency key was already used; nothing was credited again"})]},
    "SubscriptionRequest": obj(["plan", "bucket", "allowance_nanos", "period"], plan={**NAME, "maxLength": 200},
                               bucket=STR, allowance_nanos={"type": "integer", "minimum": 1, "maximum": 10**15},
                               period={"enum": ["day", "month"]}, starts_at=TIME),
    "Subscription": obj(["id", "account_id", "plan", "bucket", "allowance_nanos", "period"], id=STR,
                        account_id=STR, plan=STR, bucket=STR, allowance_nanos=NANOS,
                        period={"enum": ["day", "month"]}, starts_at=TIME, ends_at=nullable(TIME),
                        status=STR),
    "ChannelHealth": obj(["channel", "state", "success_rate", "latency_p50_ms", "latency_p95_ms",
                          "consecutive_failures", "last_error"],
                         channel=STR, state={"enum": ["closed", "open", "half_open"]},
                         success_rate=nullable({"type": "number"}), latency_p50_ms=nullable({"type": "number"}),
                         latency_p95_ms=nullable({"type": "number"}), consecutive_failures=INT,
                         last_error=nullable(STR), routes=array(STR)),
    "RoutesHealth": obj(["object", "data"], object={"const": "list"}, data=array(ref("ChannelHealth"))),
    "CatalogReloaded": obj(["reloaded", "source", "models"], reloaded=BOOL, source=nullable(STR), models=INT),
    **WEBHOOK_SCHEMAS,
    # ---------------------------------------------------------------- research (SPEC §7)
    "ResearchRequest": {
        "type": "object", "required": ["topic", "model", "max_charge_nanos"],
        "properties": {
            "topic": {"type": "string", "minLength": 1, "maxLength": 500}, "model": MODEL,
            "sections": {**array({"type": "string", "minLength": 1}), "minItems": 1, "maxItems": 12},
            "max_charge_nanos": {"type": "integer", "minimum": 1}, "dry_run": BOOL, "stream": BOOL,
            "route": STR, "context": {**STR, "description": "the user's own notes every section may use"},
        },
    },
    "ResearchEstimate": obj(["sections", "route", "bucket", "expected_nanos", "reserve_nanos", "available_nanos",
                             "allowed", "reason"],
                            sections=array(STR), route=ref("RouteRef"), bucket=STR, expected_nanos=NANOS,
                            reserve_nanos=NANOS, available_nanos=NANOS, max_charge_nanos=NANOS, allowed=BOOL,
                            reason=nullable(STR), sections_within_cap={
                                **INT, "description": "sections a run starts before one that could pass the cap"},
                            free_allowance=nullable(obj(
                                ["bucket", "available_nanos", "covers_sections"], bucket=STR,
                                available_nanos=NANOS, available_usd=STR, covers_sections=INT))),
    "ResearchSection": obj(["title", "content", "receipt"], title=STR, content=nullable(STR),
                           receipt=nullable(ref("Receipt")), error=ref("ErrorDetail")),
    "ErrorDetail": obj(["message", "type", "code", "param"], message=STR, type=STR, code=STR, param=nullable(STR)),
    "ResearchReport": obj(
        ["id", "topic", "model", "status", "sections", "total_charge_nanos", "balance_before_nanos",
         "balance_after_nanos", "disclaimer"],
        id=STR, object={"const": "research.report"}, topic=STR, model=STR, route=ref("RouteRef"), bucket=STR,
        status={"enum": ["running", "completed", "stopped_at_cap", "failed", "interrupted"]},
        sections=array(ref("ResearchSection")), context=nullable(STR), created_at=nullable(STR),
        updated_at=nullable(STR), total_charge_nanos=NANOS, total_charge_usd=USD, balance_before_nanos=NANOS,
        balance_after_nanos=nullable(NANOS), disclaimer={"const": "Research support, not financial advice."}),
    "ResearchListItem": obj(
        ["id", "object", "topic", "model", "status", "created_at", "total_charge_nanos", "sections"],
        id=STR, object={"const": "research.report"}, topic=STR, model=STR,
        status={"enum": ["running", "completed", "stopped_at_cap", "failed", "interrupted"]}, created_at=STR,
        total_charge_nanos=NANOS, total_charge_usd=USD, sections={"type": "integer", "minimum": 0}),
    "ResearchAnswer": {"anyOf": [ref("ResearchReport"), obj(["estimate"], estimate=ref("ResearchEstimate"))]},
    "ResearchList": obj(["object", "data", "has_more", "next_cursor"], object={"const": "list"},
                        data=array(ref("ResearchListItem")), has_more=BOOL, next_cursor=nullable(STR)),
    # ---------------------------------------------------------------- other dialects (SPEC §2)
    "ResponsesRequest": {
        "type": "object", "required": ["model"],
        "description": "OpenAI Responses API; translated to the route's upstream.",
        "properties": {
            "model": MODEL,
            "input": {"anyOf": [STR, array({"type": "object", "description": "message, function_call or "
                                                                             "function_call_output item"})]},
            "instructions": nullable(STR), "max_output_tokens": nullable({"type": "integer", "minimum": 1}),
            "tools": array({"type": "object"}), "tool_choice": {"anyOf": [STR, {"type": "object"}]},
            "previous_response_id": nullable(STR), "stream": BOOL, "store": BOOL, "temperature": {"type": "number"},
            "route": STR,
        },
    },
    "Response": obj(["id", "object", "status", "model", "output", "receipt"], id=STR,
                    object={"const": "response"}, created_at={"type": "number"},
                    status={"enum": ["completed", "failed", "in_progress", "incomplete"]}, model=STR,
                    output=array({"type": "object"}), usage=nullable(obj(
                        input_tokens=INT, output_tokens=INT, total_tokens=INT,
                        input_tokens_details=obj(cached_tokens=INT, cache_write_tokens=INT),
                        output_tokens_details=obj(reasoning_tokens=INT))),
                    receipt=ref("Receipt")),
    "ResponseDeleted": obj(["id", "object", "deleted"], id=STR, object={"const": "response"},
                           deleted={"const": True}),
    "ResponseItemList": obj(
        ["object", "data", "first_id", "last_id", "has_more"], object={"const": "list"},
        data=array(obj(["id", "type"], id=STR, type=STR)), first_id=nullable(STR), last_id=nullable(STR),
        has_more=BOOL),
    "MessagesRequest": {
        "type": "object", "required": ["model", "messages", "max_tokens"],
        "description": "Anthropic Messages API.",
        "properties": {
            "model": MODEL, "max_tokens": {"type": "integer", "minimum": 1},
            "messages": array(obj(["role", "content"], role={"enum": ["user", "assistant"]},
                                  content={"anyOf": [STR, array({"type": "object"})]})),
            "system": {"anyOf": [STR, array({"type": "object"})]}, "stream": BOOL,
            "tools": array({"type": "object"}), "tool_choice": {"type": "object"},
            "stop_sequences": array(STR), "temperature": {"type": "number"}, "metadata": {"type": "object"},
        },
    },
    "Message": obj(["id", "type", "role", "content", "model", "stop_reason", "usage", "receipt"], id=STR,
                   type={"const": "message"}, role={"const": "assistant"}, content=array({"type": "object"}),
                   model=STR, stop_reason=nullable(STR), stop_sequence=nullable(STR),
                   usage=obj(["input_tokens", "output_tokens"],
                             input_tokens={**INT, "description": "fresh input only"}, output_tokens=INT,
                             cache_read_input_tokens=INT, cache_creation_input_tokens=INT,
                             cache_creation=obj(ephemeral_5m_input_tokens=INT, ephemeral_1h_input_tokens=INT)),
                   receipt=ref("Receipt")),
    "CountTokensRequest": {"type": "object", "required": ["model", "messages"],
                           "properties": {"model": MODEL, "messages": array({"type": "object"}),
                                          "system": {"anyOf": [STR, array({"type": "object"})]},
                                          "tools": array({"type": "object"})}},
    "CountTokens": obj(["input_tokens"], input_tokens=INT),
    "ServerSentEvent": obj(["data"], data={**STR, "description": "JSON, or [DONE] at the end of a chat stream"},
                           event={**STR, "description": "named events: research and Responses/Messages streams"},
                           id=STR),
    # ---------------------------------------------------------------- ops
    "Health": obj(["status"], status={"const": "ok"}, pid=INT),
    "Ready": obj(["status", "checks"], status={"enum": ["ready", "not_ready"]},
                 checks=obj(["catalog", "database"], catalog=BOOL, database=BOOL)),
}

# ---------------------------------------------------------------- responses and headers

_STATUS_TEXT = {400: "invalid_request", 401: "invalid_api_key", 402: "insufficient_balance (with bucket, "
                "needed_nanos, available_nanos)", 403: "model_not_allowed / route_not_allowed / budget_exceeded / "
                "admin_disabled", 404: "model_not_found / not_found", 409: "idempotency_conflict",
                413: "request_too_large", 429: "rate_limited (with retry-after)", 502: "upstream_error",
                503: "no_healthy_channel / ledger_unavailable", 504: "upstream_timeout"}


def _error_response(status: int, schema: str) -> Schema:
    names = ["RequestId"]
    if status in (400, 401, 402, 403, 404, 413):
        names.append("X_Should_Retry")
    if status == 429:
        names.append("Retry_After")
    return {"description": _STATUS_TEXT[status], "headers": _headers(names),
            "content": {JSON: {"schema": ref(schema)}}}


RESPONSES: dict[str, Schema] = {}
for _status in _STATUS_TEXT:
    RESPONSES[f"Error{_status}"] = _error_response(_status, "Error")
    RESPONSES[f"AnthropicError{_status}"] = _error_response(_status, "AnthropicError")

HEADERS: dict[str, Schema] = {
    "RequestId": {"description": "on every response, success or error", "schema": {"type": "string"}},
    "X_Should_Retry": {"description": "false: retrying cannot fix this error", "schema": {"const": "false"}},
    "Retry_After": {"description": "seconds to wait", "schema": {"type": "string", "pattern": r"^\d+$"}},
    "Route": {"description": "route id", "schema": STR},
    "Route_Kind": {"description": "route kind", "schema": STR},
    "Bucket": {"description": "the bucket charged", "schema": STR},
    "Upstream_Model": {"schema": STR},
    "Reserved_Nanos": {"schema": {"type": "string", "pattern": r"^\d+$"}},
    "Channel": {"description": "non-streamed: the channel that served", "schema": STR},
    "Fallback": {"description": "non-streamed", "schema": {"enum": ["none", "channel", "route"]}},
    "Charge_Nanos": {"description": "non-streamed", "schema": {"type": "string", "pattern": r"^\d+$"}},
    "Ledger_Entry": {"description": "non-streamed; empty when nothing was charged", "schema": STR},
}
_TF = ["Route", "Route_Kind", "Bucket", "Upstream_Model", "Reserved_Nanos", "Channel", "Fallback", "Charge_Nanos",
       "Ledger_Entry"]
PROXY_HEADERS = {f"x-tokensforge-{n.lower().replace('_', '-')}": {"$ref": f"#/components/headers/{n}"} for n in _TF}


def proxied_ok(schema: Schema, *, stream: bool) -> Schema:
    out = ok(schema, "the answer, with its receipt" + (" (SSE when stream is true)" if stream else ""),
             stream=stream)
    out["headers"].update(PROXY_HEADERS)
    return out


# ---------------------------------------------------------------- paths

_MODEL = path_param("model_id", "model id (percent-encoded when it contains / or :)")
_ACCOUNT = path_param("account_id", "account id (acct_…)")
_RESPONSE = path_param("response_id", "response id (resp_…)")

PATHS: dict[str, Schema] = {
    "/v1/chat/completions": {"post": op(
        "OpenAI chat completions (unary or SSE), billed with a receipt", tag="client",
        op_id="createChatCompletion", request=body(ref("ChatCompletionRequest")), params=[ROUTE_HEADER],
        responses={"200": proxied_ok(ref("ChatCompletion"), stream=True), **errors(*PROXIED)})},
    "/v1/embeddings": {"post": op(
        "OpenAI embeddings (float or base64)", tag="client", op_id="createEmbedding",
        request=body(ref("EmbeddingRequest")), params=[ROUTE_HEADER],
        responses={"200": proxied_ok(ref("EmbeddingResponse"), stream=False), **errors(*PROXIED)})},
    "/v1/models": {"get": op(
        "Models this key may use, with their routes, prices, channels and health", tag="client",
        op_id="listModels", responses={"200": ok(ref("ModelList")), **errors(*CLIENT_READ)})},
    "/v1/models/{model_id}": {"get": op(
        "One model, same shape as a list item", tag="client", op_id="getModel", params=[_MODEL],
        responses={"200": ok(ref("Model")), **errors(*CLIENT_READ, 404)})},
    "/v1/quote": {"post": op(
        "What a chat request would do (route, bucket, prices, reservation), without running it", tag="client",
        op_id="quote", request=body(ref("ChatCompletionRequest")), params=[ROUTE_HEADER],
        responses={"200": ok(ref("Quote")), **errors(*CLIENT_WRITE, 404)})},
    "/v1/balance": {"get": op(
        "Every bucket of the key's account", tag="client", op_id="getBalance",
        responses={"200": ok(ref("Balance")), **errors(*CLIENT_READ)})},
    "/v1/usage": {"get": op(
        "Usage records (a project's key: its project's), newest first, cursor-paginated", tag="client",
        op_id="listUsage",
        params=[LIMIT, AFTER, query("model", STR, "model id"), query("route_kind", STR, "route kind"),
                query("bucket", STR, "bucket id"),
                query("status", {"enum": ["succeeded", "failed", "client_cancelled"]}, "request status"),
                query("key_id", STR, "only this API key's requests"),
                query("since", {"type": "string", "format": "date-time"}, "created at or after (RFC 3339)"),
                query("until", {"type": "string", "format": "date-time"}, "created before (RFC 3339)"),
                query("id", STR, "any id a client holds: req_…, chatcmpl-…, resp_…, msg_…"),
                query("format", {"enum": ["json", "csv"]}, "csv: every matching record (up to 10,000) as a file")],
        responses={"200": {**ok(ref("UsageList")), "content": {JSON: {"schema": ref("UsageList")},
                                                               "text/csv": {"schema": STR}}},
                   **errors(400, *CLIENT_READ)})},
    "/v1/usage/summary": {"get": op(
        "Spend per bucket over time, top models and routes, typical request size (the console's chart)",
        tag="client", op_id="usageSummary", params=[query("window", {"enum": ["24h", "30d"]}, "time window")],
        responses={"200": ok(ref("UsageSummary")), **errors(400, *CLIENT_READ)})},
    "/v1/ledger": {"get": op(
        "Ledger entries, newest first, cursor-paginated (a project's key: the account's own entries and its "
        "project's charges)", tag="client", op_id="listLedger",
        params=[LIMIT, AFTER, query("bucket", STR, "bucket id")],
        responses={"200": ok(ref("LedgerList")), **errors(400, *CLIENT_READ)})},
    "/v1/receipts/{request_id}": {"get": op(
        "The receipt of one finished request of this account (of its project, for a project's key)",
        tag="client", op_id="getReceipt",
        params=[path_param("request_id", "x-request-id of the request (req_…), or the answer's id "
                                         "(chatcmpl-…, resp_…, msg_…)")],
        responses={"200": ok(ref("UsageRecord")), **errors(*CLIENT_READ, 404)})},
    "/v1/responses": {"post": op(
        "OpenAI Responses API (unary or SSE); receipt on the response and on response.completed",
        tag="client", op_id="createResponse", request=body(ref("ResponsesRequest")), params=[ROUTE_HEADER],
        responses={"200": proxied_ok(ref("Response"), stream=True), **errors(*PROXIED)})},
    "/v1/responses/{response_id}": {
        "get": op("A stored response of this account, as it was returned (receipt included)", tag="client",
                  op_id="getResponse", params=[_RESPONSE], responses={"200": ok(ref("Response")),
                                                                      **errors(*CLIENT_READ, 404)}),
        "delete": op("Delete a stored response (its usage record, receipt and ledger entries stay)", tag="client",
                     op_id="deleteResponse", params=[_RESPONSE],
                     responses={"200": ok(ref("ResponseDeleted")), **errors(*CLIENT_READ, 404)}),
    },
    "/v1/responses/{response_id}/input_items": {"get": op(
        "The input items of a stored response, paginated like OpenAI's lists", tag="client",
        op_id="listResponseInputItems",
        params=[_RESPONSE, LIMIT, query("after", STR, "an item id: the page after it, in `order`"),
                query("before", STR, "an item id: the page before it, in `order`"),
                query("order", {"enum": ["asc", "desc"], "default": "desc"}, "asc: in the order sent")],
        responses={"200": ok(ref("ResponseItemList")), **errors(400, *CLIENT_READ, 404)})},
    "/v1/messages": {"post": op(
        "Anthropic Messages API (unary or SSE); receipt on the message and on the final message_delta",
        tag="client", op_id="createMessage", request=body(ref("MessagesRequest")), params=[ROUTE_HEADER],
        responses={"200": proxied_ok(ref("Message"), stream=True), **errors(*PROXIED, anthropic=True)},
        anthropic=True)},
    "/v1/messages/count_tokens": {"post": op(
        "Anthropic token count; charges nothing", tag="client", op_id="countMessageTokens",
        request=body(ref("CountTokensRequest")),
        responses={"200": ok(ref("CountTokens")), **errors(400, 401, 403, 404, 413, 503, anthropic=True)},
        anthropic=True)},
    "/v1/research/reports": {
        "post": op(
            "Research assistant: a report written section by section on a billed route (SPEC §7)",
            tag="research", op_id="createResearchReport", request=body(ref("ResearchRequest")),
            params=[ROUTE_HEADER],
            responses={"200": ok(ref("ResearchAnswer"), "the report, or {estimate} on dry_run (SSE when stream)",
                                 stream=True),
                       **errors(400, 401, 402, 403, 404, 413, 429, 503)}),
        "get": op("The account's reports, newest first, paginated", tag="research", op_id="listResearchReports",
                  params=[LIMIT, AFTER], responses={"200": ok(ref("ResearchList")), **errors(400, *CLIENT_READ)}),
    },
    "/v1/research/reports/{report_id}": {"get": op(
        "One report with its sections, receipts and totals", tag="research", op_id="getResearchReport",
        params=[path_param("report_id", "report id (rep_…)"),
                query("format", {"enum": ["json", "markdown"]}, "markdown: a file to keep")],
        responses={"200": {**ok(ref("ResearchReport")), "content": {JSON: {"schema": ref("ResearchReport")},
                                                                     "text/markdown": {"schema": STR}}},
                   **errors(400, *CLIENT_READ, 404)})},
    # ---------------------------------------------------------------- admin
    "/admin/accounts": {"post": op(
        "Create an account", tag="admin", security="AdminToken", op_id="createAccount",
        request=body(obj(["name"], name=NAME)),
        responses={"201": ok(ref("Account"), "created"), **errors(400, *ADMIN, 413)})},
    "/admin/accounts/{account_id}": {"get": op(
        "An account with its buckets, projects and keys (no secrets)", tag="admin", security="AdminToken",
        op_id="getAccount", params=[_ACCOUNT], responses={"200": ok(ref("Account")), **errors(*ADMIN, 404)})},
    "/admin/accounts/{account_id}/projects": {"post": op(
        "Create a project with its policy", tag="admin", security="AdminToken", op_id="createProject",
        params=[_ACCOUNT], request=body(obj(["name"], name=NAME,
                                            policy=nullable(ref("Policy")))),
        responses={"201": ok(ref("Project"), "created"), **errors(400, *ADMIN, 404, 413)})},
    "/admin/accounts/{account_id}/keys": {"post": op(
        "Create an API key; the plaintext is returned only here", tag="admin", security="AdminToken",
        op_id="createKey", params=[_ACCOUNT],
        request=body(obj(["name"], name=NAME, project_id=nullable(NAME),
                         policy=nullable(ref("Policy")))),
        responses={"201": ok(ref("ApiKeyCreated"), "created"), **errors(400, *ADMIN, 404, 413)})},
    "/admin/keys/{key_id}/revoke": {"post": op(
        "Revoke a key (within a second on every instance)", tag="admin", security="AdminToken",
        op_id="revokeKey", params=[path_param("key_id", "key id (key_…)")],
        responses={"200": ok(ref("ApiKey")), **errors(*ADMIN, 404)})},
    "/admin/accounts/{account_id}/topups": {"post": op(
        "Credit a bucket; the same idempotency key never credits twice", tag="admin", security="AdminToken",
        op_id="topup", params=[_ACCOUNT], request=body(ref("TopupRequest")),
        responses={"201": ok(ref("Topup"), "credited"), "200": ok(ref("Topup"), "replayed: nothing credited again"),
                   **errors(400, *ADMIN, 404, 409, 413)})},
    "/admin/catalog/reload": {"post": op(
        "Re-read the catalog file on every instance", tag="admin", security="AdminToken", op_id="reloadCatalog",
        responses={"200": ok(ref("CatalogReloaded")), **errors(400, *ADMIN)})},
    "/admin/accounts/{account_id}/subscriptions": {"post": op(
        "Start a subscription funding a pool bucket", tag="admin", security="AdminToken",
        op_id="createSubscription", params=[_ACCOUNT], request=body(ref("SubscriptionRequest")),
        responses={"201": ok(ref("Subscription"), "created"), **errors(400, *ADMIN, 404, 409, 413)})},
    "/admin/subscriptions/{subscription_id}/cancel": {"post": op(
        "End a subscription at its period end", tag="admin", security="AdminToken", op_id="cancelSubscription",
        params=[path_param("subscription_id", "subscription id")],
        responses={"200": ok(ref("Subscription")), **errors(*ADMIN, 404, 409)})},
    "/admin/accounts/{account_id}/webhooks": {
        "post": op("Add a webhook: events POSTed signed (x-tokensforge-signature); its secret is returned only here",
                   tag="admin", security="AdminToken", op_id="createWebhook", params=[_ACCOUNT],
                   request=body(ref("WebhookRequest")),
                   responses={"201": ok(ref("WebhookCreated"), "created"), **errors(400, *ADMIN, 404, 413)}),
        "get": op("The account's webhooks (no secrets)", tag="admin", security="AdminToken", op_id="listWebhooks",
                  params=[_ACCOUNT], responses={"200": ok(ref("WebhookList")), **errors(*ADMIN, 404)}),
    },
    "/admin/webhooks/{webhook_id}": {"delete": op(
        "Remove a webhook (its pending events are not delivered)", tag="admin", security="AdminToken",
        op_id="deleteWebhook", params=[path_param("webhook_id", "webhook id (wh_…)")],
        responses={"200": ok(ref("WebhookDeleted")), **errors(*ADMIN, 404)})},
    "/admin/webhooks/{webhook_id}/deliveries": {"get": op(
        "Delivery attempts, newest first, paginated", tag="admin", security="AdminToken", op_id="listDeliveries",
        params=[path_param("webhook_id", "webhook id (wh_…)"), LIMIT, AFTER],
        responses={"200": ok(ref("WebhookDeliveryList")), **errors(400, *ADMIN, 404)})},
    "/admin/routes/health": {"get": op(
        "Per channel: circuit state, success rate, latency p50/p95, consecutive failures, last error",
        tag="admin", security="AdminToken", op_id="routesHealth",
        responses={"200": ok(ref("RoutesHealth")), **errors(*ADMIN)})},
    # ---------------------------------------------------------------- ops and pages
    "/healthz": {"get": op("Process alive", tag="ops", security=None, op_id="healthz",
                           responses={"200": ok(ref("Health"))})},
    "/readyz": {"get": op("Database reachable and catalog loaded", tag="ops", security=None, op_id="readyz",
                          responses={"200": ok(ref("Ready")), "503": ok(ref("Ready"), "not ready")})},
    "/metrics": {"get": op("Prometheus metrics (text format)", tag="ops", security=None, op_id="metrics",
                           responses={"200": {"description": "Prometheus text exposition",
                                              "content": {"text/plain": {"schema": STR}}}})},
    "/playground": {"get": op("The browser playground (SPEC §6)", tag="pages", security=None, op_id="playground",
                              responses={"200": {"description": "one HTML page",
                                                 "content": {"text/html": {"schema": STR}}}})},
    "/favicon.ico": {"get": op("The console's icon", tag="pages", security=None, op_id="favicon",
                               responses={"200": {"description": "an ICO file",
                                                  "content": {"image/x-icon": {"schema": STR}}}})},
    "/openapi.json": {"get": op("This document", tag="pages", security=None, op_id="openapi",
                                responses={"200": {"description": "OpenAPI 3.1",
                                                   "content": {JSON: {"schema": {"type": "object"}}}}})},
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "Tokens Forge",
        "version": "0.1.0",
        "description": "OpenAI-compatible LLM API gateway: every request shows its route, bucket, price and "
                       "channels before it runs (POST /v1/quote) and after (its receipt). Money is integer "
                       "nano-USD. Errors: {\"error\": {\"message\", \"type\", \"code\", \"param\"}} "
                       "(Anthropic's shape on /v1/messages*).",
    },
    "servers": [{"url": "/"}],
    "tags": [{"name": n} for n in ("client", "research", "admin", "ops", "pages")],
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "responses": RESPONSES,
        "headers": HEADERS,
        "securitySchemes": {
            "ApiKey": {"type": "http", "scheme": "bearer", "description": "an API key: tf-…"},
            "AnthropicApiKey": {"type": "apiKey", "in": "header", "name": "x-api-key",
                                "description": "the same API key, as Anthropic clients send it"},
            "AdminToken": {"type": "http", "scheme": "bearer", "description": "TOKENSFORGE_ADMIN_TOKEN"},
        },
    },
}


def operations(document: dict[str, Any] = DOCUMENT) -> list[tuple[str, str, dict[str, Any]]]:
    """(METHOD, path, operation) for every operation of the document."""
    return [(method.upper(), path, operation)
            for path, item in document["paths"].items() for method, operation in item.items()]
