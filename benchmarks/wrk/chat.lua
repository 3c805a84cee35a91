-- wrk script: non-streamed chat completion (max_tokens 20).
-- usage: wrk -t2 -c32 -d10s -s chat.lua http://127.0.0.1:PORT -- <bearer token> [<token> ...]
-- With several tokens each request uses the next one (round robin per wrk thread).
-- done() prints one line "WRK_JSON {...}" (latencies in microseconds).

local BODY = '{"model":"gpt-4o-mini","max_tokens":20,'
  .. '"messages":[{"role":"user","content":"Say something short about benchmarks."}]}'
local requests = {}
local next_index = 1

function init(args)
  local tokens = {}
  for i = 1, #args do
    if args[i] ~= "" then tokens[#tokens + 1] = args[i] end
  end
  if #tokens == 0 then tokens[1] = "none" end
  for i, token in ipairs(tokens) do
    requests[i] = wrk.format("POST", "/v1/chat/completions",
      {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. token}, BODY)
  end
end

function request()
  local r = requests[next_index]
  next_index = next_index % #requests + 1
  return r
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,'
    .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d,'
    .. '"errors_connect":%d,"errors_read":%d,"errors_write":%d,"errors_status":%d,"errors_timeout":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
