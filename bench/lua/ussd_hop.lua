-- USSD menu hops in long sessions: "" (opens the session), then 4 (Language), 0 (Back), 4, 0, ...
-- as Africa's Talking sends them (every input so far joined by '*'). Run with one connection per
-- thread (-t N -c N) so a session's hops never overtake each other. Sessions are BENCH_HOPS hops on
-- average, each between 0.8x and 1.2x of it: with the same length everywhere, the connections opened
-- their sessions in lockstep, every opening hop at once, which real traffic never does.
dofile(os.getenv("BENCH_LUA_DIR") .. "/common.lua")
local phone = os.getenv("BENCH_PHONE") or "+250788000001"
local path = os.getenv("BENCH_PATH") or wrk.path  -- the URL's path and query
local run = os.getenv("BENCH_RUN") or "r"
local hops = tonumber(os.getenv("BENCH_HOPS") or "50")

local function session_length()
  return math.random(math.floor(hops * 0.8), math.ceil(hops * 1.2))
end

function init(args)
  reset_counters()
  math.randomseed(tid * 7919 + 17)
  session_n, hop, length = 0, 0, session_length()
end

-- The state moves on in response(), not here: wrk calls request() once more than it sends on thread 0
-- (to inspect it), and with one connection per thread an answer always comes before the next request.
local function text_for(h)
  if h == 0 then return "" end
  local keys = {}
  for i = 1, h do keys[i] = (i % 2 == 1) and "4" or "0" end
  return table.concat(keys, "*")
end

function request()
  local body = "sessionId=h" .. run .. "t" .. tid .. "s" .. session_n .. "&serviceCode=" .. enc("*384*123#")
    .. "&phoneNumber=" .. enc(phone) .. "&networkCode=63510&text=" .. enc(text_for(hop))
  return wrk.format("POST", path, {["Content-Type"] = "application/x-www-form-urlencoded"}, body)
end

function response(status, headers, body)
  if status ~= 200 or body:sub(1, 4) ~= "CON " then bad = bad + 1 end
  hop = (hop + 1) % length
  if hop == 0 then session_n, length = session_n + 1, session_length() end
end
