-- Full USSD pay sessions: "" (home), 1 (Pay), 1*1 (first payment type), 1*1*1 (Confirm -> END with the
-- payment reference). One connection per thread (-t N -c N), one member phone per thread, so a
-- session's hops stay in order and no two sessions of one phone overlap.
dofile(os.getenv("BENCH_LUA_DIR") .. "/common.lua")
local phones = {}
for p in string.gmatch(os.getenv("BENCH_PHONES") or "+250788000001", "[^,]+") do table.insert(phones, p) end
local path = os.getenv("BENCH_PATH") or wrk.path  -- the URL's path and query
local run = os.getenv("BENCH_RUN") or "r"
local TEXTS = {"", "1", "1*1", "1*1*1"}

function init(args)
  reset_counters()
  session_n, hop = 0, 0
  phone = phones[(tid % #phones) + 1]
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
  if hop == 0 then session_n = session_n + 1 end
end
