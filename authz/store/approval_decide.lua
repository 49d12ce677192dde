-- An operator's decision on a pending request, or the refund of a consumed use.
--
-- KEYS[1]  b:<binding>   KEYS[2]  i:<id>   KEYS[3]  index (see approval_gate.lua)
-- ARGV: op (approve | reject | refund), id, now (ms), operator, reason
-- Returns {'missing'} when no live request has this id, else {status, field, value, ...}
-- with status 'ok', or 'conflict' when the request was already decided.

local h = KEYS[1]
local op, id, now = ARGV[1], ARGV[2], tonumber(ARGV[3])

local function reply(status)
  local out = {status}
  for _, item in ipairs(redis.call('HGETALL', h)) do
    out[#out + 1] = item
  end
  return out
end

if redis.call('EXISTS', h) == 0 or redis.call('HGET', h, 'id') ~= id then
  return {'missing'}
end
local state = redis.call('HGET', h, 'state')

if op == 'refund' then
  if state == 'approved' or state == 'consumed' then
    redis.call('HINCRBY', h, 'uses_left', 1)
    redis.call('HSET', h, 'state', 'approved')
  end
  return reply('ok')
end

if tonumber(redis.call('HGET', h, 'expires_at')) * 1000 <= now then
  return {'missing'}
end
if state ~= 'pending' then
  return reply('conflict')
end
if op == 'approve' then
  -- An approved call may be made `uses` times within a fresh ttl (the rule's) from now.
  local ttl_ms = math.floor(tonumber(redis.call('HGET', h, 'ttl_s')) * 1000)
  local expires_ms = now + ttl_ms
  redis.call('HSET', h, 'state', 'approved', 'operator', ARGV[4],
    'expires_at', string.format('%.3f', expires_ms / 1000))
  redis.call('PEXPIRE', h, ttl_ms + 60000)
  redis.call('PEXPIRE', KEYS[2], ttl_ms + 60000)
  redis.call('ZADD', KEYS[3], expires_ms, id)
else
  redis.call('HSET', h, 'state', 'rejected', 'operator', ARGV[4], 'reason', ARGV[5])
end
return reply('ok')
