-- Provider rate limits shared by every replica: a sliding one-minute log per deployment.
-- Loaded by worker/state/ratelimit.py. One script, three entry points (ARGV[1]).
--
-- KEYS[1] the deployment's window: a sorted set of "<call id>|<tokens>" scored by the time (ms)
--         the call was let through; KEYS[2] its cooldown key (set after a 429 the provider sent).

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function tokens_of(member)
  return tonumber(string.match(member, '|(%d+)$')) or 0
end

-- ARGV: 'take', call id, tokens, rpm (-1 none), tpm (-1 none), share (0..1: the part of the limit
-- this call may use; batch calls leave the rest to interactive ones), window_ms
-- -> {'taken', rpm_left, tpm_left} | {'full', wait_ms} | {'cooling', wait_ms}
local function take()
  local id, tokens = ARGV[2], tonumber(ARGV[3])
  local rpm, tpm, share, window = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
  local cooling = redis.call('PTTL', KEYS[2])
  if cooling > 0 then
    return {'cooling', cooling}
  end
  local now = now_ms()
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  local calls = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
  local count, used = #calls / 2, 0
  for i = 1, #calls, 2 do
    used = used + tokens_of(calls[i])
  end
  if rpm >= 0 and count + 1 > math.floor(rpm * share) then
    -- room comes back when the oldest calls leave the window
    local excess = count + 1 - math.floor(rpm * share)
    local index = math.min(excess, count) * 2
    if index < 2 then return {'full', window} end
    return {'full', tonumber(calls[index]) + window - now + 1}
  end
  if tpm >= 0 and used + tokens > math.floor(tpm * share) then
    if tokens > math.floor(tpm * share) then return {'full', -1} end  -- never fits
    local freed, need = 0, used + tokens - math.floor(tpm * share)
    for i = 1, #calls, 2 do
      freed = freed + tokens_of(calls[i])
      if freed >= need then return {'full', tonumber(calls[i + 1]) + window - now + 1} end
    end
    return {'full', window}
  end
  redis.call('ZADD', KEYS[1], now, id .. '|' .. tostring(tokens))
  redis.call('PEXPIRE', KEYS[1], window)
  local rpm_left, tpm_left = -1, -1
  if rpm >= 0 then rpm_left = rpm - count - 1 end
  if tpm >= 0 then tpm_left = tpm - used - tokens end
  return {'taken', rpm_left, tpm_left}
end

-- ARGV: 'correct', call id, estimated tokens, actual tokens, window_ms: the provider's usage
-- replaces the estimate, and the call counts from now, when its answer came: the provider saw it
-- arrive no later than that, so our window never frees its room before the provider's does (a
-- call's time from our admission to the provider's door can be seconds in a burst).
local function correct()
  local old = ARGV[2] .. '|' .. ARGV[3]
  if redis.call('ZREM', KEYS[1], old) == 1 then
    redis.call('ZADD', KEYS[1], now_ms(), ARGV[2] .. '|' .. ARGV[4])
    redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[5]))
  end
  return 1
end

-- ARGV: 'cool', ms: no call to this deployment from any replica for ms (a 429's Retry-After)
local function cool()
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
  return 1
end

if ARGV[1] == 'take' then return take() end
if ARGV[1] == 'correct' then return correct() end
return cool()
