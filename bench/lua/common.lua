-- Shared by the bench scripts (loaded with dofile): per-thread counters and the BENCH summary line.
threads = {}
local thread_id = 0

function setup(thread)
  thread:set("tid", thread_id)
  thread_id = thread_id + 1
  table.insert(threads, thread)
end

function enc(s)
  return (s:gsub("[^%w%-_%.~]", function(c) return string.format("%%%02X", string.byte(c)) end))
end

-- Counters a script's response() may bump; done() adds them up over the threads.
COUNTERS = {"bad", "ends", "created", "replayed", "completed", "duplicate"}

function reset_counters()
  for _, name in ipairs(COUNTERS) do _G[name] = 0 end
end

function done(summary, latency, requests)
  local extra = ""
  for _, name in ipairs(COUNTERS) do
    local total = 0
    for _, t in ipairs(threads) do total = total + (t:get(name) or 0) end
    extra = extra .. string.format(', "%s": %d', name, total)
  end
  io.write(string.format('BENCH {"requests": %d, "seconds": %f, "p50": %f, "p95": %f, "p99": %f, '
    .. '"errors": %d, "non2xx": %d%s}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50), latency:percentile(95),
    latency:percentile(99), summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout, summary.errors.status, extra))
end
