-- GET /api/v1/tracks/{id}, ids drawn at random from a file (one id a line): the hot set.
-- wrk ... -s ids.lua URL -- IDS_FILE

local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "report.lua")

local threads = {}
local paths = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  for line in io.lines(args[1]) do
    if line ~= "" then table.insert(paths, "/api/v1/tracks/" .. line) end
  end
  assert(#paths > 0, "no ids in " .. args[1])
  math.randomseed(os.time() * 100 + (tid or 0))
end

function request()
  return wrk.format("GET", paths[math.random(#paths)])
end
