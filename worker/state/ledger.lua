-- The budget ledger's atomic steps. Loaded by worker/state/ledger.py; one script, three entry points
-- (ARGV[1] = "reserve" | "claim-reserve" | "settle"), so the shared sweep below is written once.
--
-- Each scope (a task, an agent's day, the whole day) is a hash {spent, reserved, m:<model>...}
-- plus a sorted set of live reservations, member "<request_id>|<token>|<nano_usd>", scored by
-- the time (ms) the reservation expires. Money is integer nano-dollars, never floats.
--
-- KEYS: [1] the reservation record (resv:<request_id>), [2] the settled marker, [3] the result key,
--       then for each scope i: KEYS[3+2i-1] = scope hash, KEYS[3+2i] = its reservation set.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function member_amount(member)
  return tonumber(string.match(member, '|(%d+)$')) or 0
end

-- Release every reservation whose worker never settled it (it died, or lost Redis).
local function sweep(hash, set, now)
  local expired = redis.call('ZRANGEBYSCORE', set, '-inf', now)
  for _, member in ipairs(expired) do
    redis.call('HINCRBY', hash, 'reserved', -member_amount(member))
  end
  if #expired > 0 then
    redis.call('ZREMRANGEBYSCORE', set, '-inf', now)
  end
  return #expired
end

local function scope_keys(n)
  local scopes = {}
  for i = 1, n do
    scopes[i] = {hash = KEYS[3 + 2 * i - 1], set = KEYS[3 + 2 * i]}
  end
  return scopes
end

-- ARGV: op, request_id, token, amount, ttl_ms, n, then per scope: limit (nano, -1 = none), expire_at (s, 0 = keep)
local function reserve()
  local rid, token, amount, ttl_ms, n = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
  local scopes = scope_keys(n)
  local existing = redis.call('HGET', KEYS[1], 'member')
  if existing then
    -- A redelivery or a takeover of a dead worker's request: adopt its reservation, do not add one.
    return {'adopted', existing}
  end
  local now = now_ms()
  for i = 1, n do
    sweep(scopes[i].hash, scopes[i].set, now)
  end
  for i = 1, n do
    local limit = tonumber(ARGV[6 + 2 * i - 1])
    if limit >= 0 then
      local spent = tonumber(redis.call('HGET', scopes[i].hash, 'spent') or '0')
      local reserved = tonumber(redis.call('HGET', scopes[i].hash, 'reserved') or '0')
      if spent + reserved + amount > limit then
        return {'exceeded', tostring(i), tostring(spent), tostring(reserved)}
      end
    end
  end
  local member = rid .. '|' .. token .. '|' .. tostring(amount)
  for i = 1, n do
    local expire_at = tonumber(ARGV[6 + 2 * i])
    redis.call('HINCRBY', scopes[i].hash, 'reserved', amount)
    redis.call('ZADD', scopes[i].set, now + ttl_ms, member)
    if expire_at > 0 then
      redis.call('EXPIREAT', scopes[i].hash, expire_at)
      redis.call('EXPIREAT', scopes[i].set, expire_at)
    end
  end
  redis.call('HSET', KEYS[1], 'member', member)
  redis.call('PEXPIRE', KEYS[1], ttl_ms)
  return {'reserved', member}
end

-- ARGV: op, member, actual (nano), model ('' = none), result_json ('' = none), result_ttl_s,
--       settled_ttl_s, n, cached (0/1)
local function settle()
  local member, actual, model = ARGV[2], tonumber(ARGV[3]), ARGV[4]
  local result, result_ttl, settled_ttl, n, cached = ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[8]), ARGV[9]
  if redis.call('SET', KEYS[2], '1', 'NX', 'EX', settled_ttl) == false then
    return 'already-settled'
  end
  local scopes = scope_keys(n)
  local amount = member_amount(member)
  for i = 1, n do
    if redis.call('ZREM', scopes[i].set, member) == 1 then
      redis.call('HINCRBY', scopes[i].hash, 'reserved', -amount)
    end
    if model ~= '' then
      redis.call('HINCRBY', scopes[i].hash, 'spent', actual)
      redis.call('HINCRBY', scopes[i].hash, 'm:' .. model, actual)
      redis.call('HINCRBY', scopes[i].hash, 'calls', 1)
      if cached == '1' then
        redis.call('HINCRBY', scopes[i].hash, 'cache_hits', 1)
      end
    end
  end
  if redis.call('HGET', KEYS[1], 'member') == member then
    redis.call('DEL', KEYS[1])
  end
  if result ~= '' then
    redis.call('SET', KEYS[3], result, 'EX', result_ttl)
  end
  return 'settled'
end

-- The request's single-flight claim (worker/state/flight.py's _CLAIM) and its reservation in one
-- step (issue #21: one round trip fewer per uncached request). ARGV: as reserve's, then the claim's
-- token and ttl_ms; KEYS: as reserve's, then the flight key and the answer key. The answer is read
-- first, then the claim taken, then the budget reserved; over budget the claim is given back, so a
-- refused request leaves no claim behind.
local function claim_reserve()
  local n = tonumber(ARGV[6])
  local flight, answer_key = KEYS[#KEYS - 1], KEYS[#KEYS]
  local token, claim_ttl_ms = ARGV[7 + 2 * n], ARGV[8 + 2 * n]
  local answer = redis.call('GET', answer_key)
  if answer then return {'found', answer} end
  if not redis.call('SET', flight, token, 'NX', 'PX', claim_ttl_ms) then
    local holder = redis.call('GET', flight)
    if holder ~= token then return {'held', holder or ''} end
  end
  local reply = reserve()
  if reply[1] == 'exceeded' and redis.call('GET', flight) == token then
    redis.call('DEL', flight)
  end
  return reply
end

if ARGV[1] == 'reserve' then
  return reserve()
end
if ARGV[1] == 'claim-reserve' then
  return claim_reserve()
end
return settle()
