-- An operator's decision on a pending request, or the refund of a consumed use.
--
-- KEYS[1]  b:<binding>   KEYS[2]  i:<id>   KEYS[3]  index (see approval_gate.lua)
-- ARGV: op (approve | reject | refund), id, now (ms), ttl (ms), operator, reason
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
  -- An approved call may be made `uses` times within a fresh ttl from now.
  local expires_ms = now + tonumber(ARGV[4])
  redis.call('HSET', h, 'state', 'approved', 'operator', ARGV[5],
    'expires_at', string.format('%.3f', expires_ms / 1000))
  redis.call('PEXPIRE', h, ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
  redis.call('ZADD', KEYS[3], expires_ms, id)
else
  redis.call('HSET', h, 'state', 'rejected', 'operator', ARGV[5], 'reason', ARGV[6])
end
return reply('ok')
