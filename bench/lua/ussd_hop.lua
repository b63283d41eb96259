-- USSD menu hops: each connection opens a session (text="") and answers one menu option,
-- so every hop reads and writes the session in Redis. Phone and option come from the environment.
local counter = 0
local thread_id = 0
local phone = os.getenv("BENCH_PHONE") or "+250788000001"
local option = os.getenv("BENCH_OPTION") or "4"
local path = os.getenv("BENCH_PATH") or "/"

function setup(thread)
  thread:set("tid", thread_id)
  thread_id = thread_id + 1
end

local function enc(s)
  return (s:gsub("[^%w%-_%.~]", function(c) return string.format("%%%02X", string.byte(c)) end))
end

function request()
  counter = counter + 1
  local session = "b" .. tid .. "x" .. math.floor(counter / 2)
  local text = (counter % 2 == 0) and option or ""
  local body = "sessionId=" .. session .. "&serviceCode=" .. enc("*384*123#") .. "&phoneNumber=" .. enc(phone)
    .. "&networkCode=63510&text=" .. enc(text)
  return wrk.format("POST", path, {["Content-Type"] = "application/x-www-form-urlencoded"}, body)
end

bad = 0
function response(status, headers, body)
  if status ~= 200 or (body:sub(1, 4) ~= "CON " and body:sub(1, 4) ~= "END ") then bad = bad + 1 end
end

function done(summary, latency, requests)
  io.write(string.format('BENCH {"requests": %d, "seconds": %f, "p50": %f, "p95": %f, "p99": %f, "errors": %d, "non2xx": %d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50), latency:percentile(95), latency:percentile(99),
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout, summary.errors.status))
end
