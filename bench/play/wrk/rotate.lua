-- bench/play.sh's wrk script: every request picks a path (and a player token, and a byte range)
-- at random, so one run rotates over many tracks, users and offsets.
--
--   wrk ... -s rotate.lua URL -- PATHS_FILE TOKENS_FILE|- [RANGE_BYTES MAX_START]
--
-- PATHS_FILE: one path a line ("/play/42?format=aac", "/healthz", "/demo/10001/flac.flac").
-- TOKENS_FILE: one player a line: a token, sent as `Authorization: Bearer`, then optionally a
--   space and query parameters that player always adds (e.g. "format=aac": a real player keeps
--   its formats, so its session's rendition does not flip on every request); "-" for none.
-- RANGE_BYTES > 0: `Range: bytes=S-(S+RANGE_BYTES-1)` with S uniform in [0, MAX_START].
-- No response() callback: wrk would then copy every body into Lua (1 MiB per proxy request).
-- Statuses are checked from the servers' own counters (Edge's /metrics) and from `bytes`.

local threads = {}
local paths, tokens, queries = {}, {}, {}
local range_bytes, max_start = 0, 0

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

local function lines(file)
  local out = {}
  for line in io.lines(file) do
    if line ~= "" then table.insert(out, line) end
  end
  return out
end

function init(args)
  paths = lines(args[1])
  assert(#paths > 0, "no paths in " .. args[1])
  if args[2] and args[2] ~= "-" then
    for _, line in ipairs(lines(args[2])) do
      local token, query = line:match("^(%S+)%s*(.*)$")
      table.insert(tokens, token)
      table.insert(queries, query)
    end
    assert(#tokens > 0, "no tokens in " .. args[2])
  end
  range_bytes = tonumber(args[3] or "0")
  max_start = tonumber(args[4] or "0")
  math.randomseed(os.time() * 100 + (tid or 0))
end

function request()
  local headers = {}
  local path = paths[math.random(#paths)]
  if #tokens > 0 then
    local k = math.random(#tokens)
    headers["Authorization"] = "Bearer " .. tokens[k]
    if queries[k] ~= "" then
      path = path .. (path:find("?", 1, true) and "&" or "?") .. queries[k]
    end
  end
  if range_bytes > 0 then
    local s = math.random(0, max_start)
    headers["Range"] = string.format("bytes=%d-%d", s, s + range_bytes - 1)
  end
  return wrk.format("GET", path, headers)
end

function done(summary, latency, requests)
  local seconds = summary.duration / 1e6
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"seconds":%.3f,"rps":%.1f,"bytes":%d,"mib_per_s":%.2f,' ..
    '"p50_ms":%.3f,"p90_ms":%.3f,"p99_ms":%.3f,"max_ms":%.3f,"mean_ms":%.3f,"non2xx":%d,' ..
    '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d}\n',
    summary.requests, seconds, summary.requests / seconds, summary.bytes,
    summary.bytes / seconds / 1048576,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000, latency.mean / 1000,
    e.status, e.connect, e.read, e.write, e.timeout))
end
