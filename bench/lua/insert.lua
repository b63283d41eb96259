-- POST /v1/payments (or the bare INSERT baseline) with a fresh idempotency key per request.
local counter = 0
local thread_id = 0
local path = os.getenv("BENCH_PATH") or "/"
local token = os.getenv("BENCH_TOKEN") or ""
local ptype = os.getenv("BENCH_PAYMENT_TYPE") or "x"
local run = os.getenv("BENCH_RUN") or "r"

function setup(thread)
  thread:set("tid", thread_id)
  thread_id = thread_id + 1
end

function request()
  counter = counter + 1
  local body = string.format('{"paymentTypeId": "%s", "amount": 5000, "paymentMethod": "MOBILE_MONEY_MTN", '
    .. '"paymentAccount": "+250788000001", "description": "bench", "idempotencyKey": "bench-%s-%d-%d"}',
    ptype, run, tid, counter)
  local headers = {["Content-Type"] = "application/json"}
  if token ~= "" then headers["Authorization"] = "Bearer " .. token end
  return wrk.format("POST", path, headers, body)
end

function done(summary, latency, requests)
  io.write(string.format('BENCH {"requests": %d, "seconds": %f, "p50": %f, "p95": %f, "p99": %f, "errors": %d, "non2xx": %d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50), latency:percentile(95), latency:percentile(99),
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout, summary.errors.status))
end
