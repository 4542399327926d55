-- GET /api/v1/search?q=..., every request a different query (a cache miss): thread k of n sends
-- lines k, k+n, k+2n, ... of a file of URL-encoded, distinct queries. A thread that runs out
-- starts over (those repeats may be cache hits): `wrapped` in the result says how many times.
-- wrk ... -s search.lua URL -- QUERIES_FILE NTHREADS

local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "report.lua")

local threads = {}
local paths = {}
local i, step = 1, 1
wraps = 0

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function bench_wrapped()
  local total = 0
  for _, t in ipairs(threads) do total = total + (t:get("wraps") or 0) end
  return total
end

function init(args)
  for line in io.lines(args[1]) do
    if line ~= "" then table.insert(paths, "/api/v1/search?q=" .. line) end
  end
  assert(#paths > 0, "no queries in " .. args[1])
  step = tonumber(args[2] or "1")
  i = (tid or 0) + 1
end

function request()
  if i > #paths then
    i = (tid or 0) + 1
    wraps = wraps + 1
  end
  local path = paths[i]
  i = i + step
  return wrk.format("GET", path)
end
