-- POST /rank for wrk (an external, compiled HTTP client: a second witness besides the project's
-- own load generator). Closed loop: with -c1 one request in flight at a time, i.e. light load.
--
--   WRK_USERS=414,415,416 WRK_CANDIDATES='[1,2,3,4,5]' \
--     wrk -t1 -c1 -d20s --latency -s bench/wrk_rank.lua http://127.0.0.1:8000
--
-- Each request names its user in the body and in the routing header, as the API asks; users
-- rotate through WRK_USERS. Against Serve's floor (serving/floor.py) the same script measures
-- Serve's own cost on this path.
local users = {}
for u in string.gmatch(os.getenv("WRK_USERS") or "1", "[^,]+") do
  users[#users + 1] = u
end
local candidates = os.getenv("WRK_CANDIDATES") or "[1, 2, 3]"
local header = os.getenv("WRK_ROUTING_HEADER") or "x-session-id"
local n = 0

request = function()
  n = n + 1
  local user = users[(n % #users) + 1]
  local body = '{"user_id": ' .. user .. ', "candidates": ' .. candidates .. ', "slo_class": "loose"}'
  return wrk.format("POST", "/rank", { ["content-type"] = "application/json", [header] = user }, body)
end

response = function(status, headers, body)
  if status ~= 200 then
    io.stderr:write("status " .. status .. ": " .. body .. "\n")
  end
end
