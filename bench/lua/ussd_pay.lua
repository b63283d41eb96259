-- Full USSD pay sessions: "" (home), 1 (Pay), 1*1 (first payment type), 1*1*1 (Confirm -> END with the
-- payment reference). One connection per thread (-t N -c N), its own members, a session each in turn, so a
-- session's hops stay in order, no two sessions of one phone overlap, and no member pays again while her
-- payment is open (the gateway would refuse it: none of these payments is run). The members' numbers follow
-- one another from BENCH_PHONE_FIRST (bench/run.py seed), BENCH_PHONES_PER_CONNECTION per thread.
dofile(os.getenv("BENCH_LUA_DIR") .. "/common.lua")
local first = os.getenv("BENCH_PHONE_FIRST") or "+250788100001"
local prefix, start = first:sub(1, -7), tonumber(first:sub(-6))
local per = tonumber(os.getenv("BENCH_PHONES_PER_CONNECTION") or "1")

local function member_phone(t, n)
  return prefix .. string.format("%06d", start + t * per + (n % per))
end
local path = os.getenv("BENCH_PATH") or wrk.path  -- the URL's path and query
local run = os.getenv("BENCH_RUN") or "r"
local TEXTS = {"", "1", "1*1", "1*1*1"}

function init(args)
  reset_counters()
  session_n, hop = 0, 0
  phone = member_phone(tid, 0)
end

-- The state moves on in response() (see ussd_hop.lua).
function request()
  local text = TEXTS[hop + 1]
  local body = "sessionId=p" .. run .. "t" .. tid .. "s" .. session_n .. "&serviceCode=" .. enc("*384*123#")
    .. "&phoneNumber=" .. enc(phone) .. "&networkCode=63510&text=" .. enc(text)
  return wrk.format("POST", path, {["Content-Type"] = "application/x-www-form-urlencoded"}, body)
end

function response(status, headers, body)
  local last = hop == #TEXTS - 1
  if status ~= 200 or body:sub(1, 4) ~= (last and "END " or "CON ") then
    bad = bad + 1
  elseif last then
    ends = ends + 1
  end
  hop = (hop + 1) % #TEXTS
  if hop == 0 then
    session_n = session_n + 1
    phone = member_phone(tid, session_n)
  end
end
