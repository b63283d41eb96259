-- POST /v1/payments (or the bare INSERT baseline) with a fresh idempotency key per request.
dofile(os.getenv("BENCH_LUA_DIR") .. "/common.lua")
local path = os.getenv("BENCH_PATH") or wrk.path  -- the URL's path and query
local token = os.getenv("BENCH_TOKEN") or ""
local ptype = os.getenv("BENCH_PAYMENT_TYPE") or "x"
local run = os.getenv("BENCH_RUN") or "r"
local method = os.getenv("BENCH_METHOD") or "MOBILE_MONEY_MTN"
local account = os.getenv("BENCH_ACCOUNT") or "+250788000001"
local amount = os.getenv("BENCH_AMOUNT") or "5000"

function init(args)
  reset_counters()
  counter = 0
end

function request()
  counter = counter + 1
  local body = string.format('{"paymentTypeId": "%s", "amount": %s, "paymentMethod": "%s", '
    .. '"paymentAccount": "%s", "description": "bench", "idempotencyKey": "bench-%s-%d-%d"}',
    ptype, amount, method, account, run, tid, counter)
  local headers = {["Content-Type"] = "application/json"}
  if token ~= "" then headers["Authorization"] = "Bearer " .. token end
  return wrk.format("POST", path, headers, body)
end

function response(status, headers, body)
  -- A replay of a key answers 201 too, marked Idempotent-Replayed (the API payments; the baseline never replays).
  if status == 201 and headers["Idempotent-Replayed"] == nil then created = created + 1
  elseif status == 201 or status == 200 then replayed = replayed + 1 else bad = bad + 1 end
end
