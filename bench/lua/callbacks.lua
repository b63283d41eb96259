-- Provider callbacks: each line of BENCH_FILE is one signed callback body, sent once. One connection
-- per thread (-t N -c N); thread i sends lines i, i+N, ...; the position moves on in response()
-- (wrk calls request() once more than it sends on thread 0), and a thread stops after its last answer.
dofile(os.getenv("BENCH_LUA_DIR") .. "/common.lua")
local path = os.getenv("BENCH_PATH") or "/"
local nthreads = tonumber(os.getenv("BENCH_THREADS") or "1")

function init(args)
  reset_counters()
  bodies = {}
  local n = 0
  for line in io.lines(os.getenv("BENCH_FILE")) do
    if n % nthreads == tid then table.insert(bodies, line) end
    n = n + 1
  end
  position = 1
end

function request()
  local body = bodies[math.min(position, #bodies)] or "{}"
  return wrk.format("POST", path, {["Content-Type"] = "application/json"}, body)
end

function response(status, headers, body)
  if status ~= 200 then
    bad = bad + 1
  elseif body:find('"completed"', 1, true) then
    completed = completed + 1
  elseif body:find('"duplicate"', 1, true) then
    duplicate = duplicate + 1
  else
    bad = bad + 1
  end
  position = position + 1
  if position > #bodies then wrk.thread:stop() end
end
