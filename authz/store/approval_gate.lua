-- One approval-gated call: report the open request, consume one approved use, or open a
-- new request, atomically (two replicas never both consume the last use).
--
-- KEYS[1]  b:<binding>  hash: the approval for this exact call (see authz/approvals.py)
-- KEYS[2]  i:<new id>   points from the new request's id to its binding (written if opened)
-- KEYS[3]  index        sorted set: approval id -> expiry (ms), for listing and expiry reports
-- ARGV[1]  now (ms)   ARGV[2]  ttl (ms)   ARGV[3]  the binding key
-- ARGV[4..] field, value pairs of the request to open if none is live
-- Returns {verdict, field, value, ...}: verdict is created, pending, approved or rejected.

local h = KEYS[1]
local now = tonumber(ARGV[1])

local function reply(verdict)
  local out = {verdict}
  for _, item in ipairs(redis.call('HGETALL', h)) do
    out[#out + 1] = item
  end
  return out
end

if redis.call('EXISTS', h) == 1 then
  local state = redis.call('HGET', h, 'state')
  local expires_ms = tonumber(redis.call('HGET', h, 'expires_at')) * 1000
  if expires_ms > now then
    if state == 'pending' then
      return reply('pending')
    elseif state == 'rejected' then
      return reply('rejected')
    elseif state == 'approved' then
      if redis.call('HINCRBY', h, 'uses_left', -1) <= 0 then
        redis.call('HSET', h, 'state', 'consumed')
      end
      return reply('approved')
    end
  end
  -- Consumed or expired: that request is over; the call needs a new one.
  redis.call('DEL', h)
end

local fields = {}
for i = 4, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
redis.call('HSET', h, unpack(fields))
-- Records outlive their expiry by a minute so the expiry can still be reported in full;
-- `expires_at`, not the key's TTL, decides whether a request is live.
local keep_ms = tonumber(ARGV[2]) + 60000
redis.call('PEXPIRE', h, keep_ms)
local id = redis.call('HGET', h, 'id')
redis.call('SET', KEYS[2], ARGV[3], 'PX', keep_ms)
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), id)
return reply('created')
