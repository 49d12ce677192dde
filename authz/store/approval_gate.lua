-- One approval-gated call: report the open request, consume one approved use, or open a
-- new request, atomically (two replicas never both consume the last use).
--
-- Every approval key carries the hash tag {approvals}, so all of them live in one Redis
-- Cluster slot and every script names its keys (approvals are a human's pace: one slot
-- carries them easily).
-- KEYS[1]  records    hash: approval id -> the approval as JSON (its public form plus
--                     "binding"; see authz/approvals.py)
-- KEYS[2]  bindings   hash: binding key -> the id of the approval for that exact call
-- KEYS[3]  expiries   sorted set: approval id -> expiry (ms), to report each expiry once
-- ARGV[1]  now (ms)   ARGV[2]  the binding key
-- ARGV[3]  the request to open if none is live (JSON)   ARGV[4]  its expiry (ms)
-- Returns {verdict, approval JSON}: verdict is created, pending, approved or rejected.

local records, bindings, expiries = KEYS[1], KEYS[2], KEYS[3]
local now, binding = tonumber(ARGV[1]), ARGV[2]

-- `expires_at`, not a key's TTL, decides whether a request is live; the replicas take
-- expired records out (approval_expired.lua). The keys' TTL only makes them go once every
-- approval in them is over, even with no replica left to do that: a request approved just
-- before it expired lives one more ttl, and a minute of grace follows for the report.
local function keep(ttl_ms)
  local ms = 2 * ttl_ms + 60000
  for _, key in ipairs(KEYS) do
    if redis.call('PTTL', key) < ms then
      redis.call('PEXPIRE', key, ms)
    end
  end
end

local id = redis.call('HGET', bindings, binding)
if id then
  local raw = redis.call('HGET', records, id)
  if raw then
    local approval = cjson.decode(raw)
    if approval.expires_at * 1000 > now then
      if approval.state == 'pending' or approval.state == 'rejected' then
        return {approval.state, raw}
      elseif approval.state == 'approved' then
        approval.uses_left = approval.uses_left - 1
        if approval.uses_left <= 0 then
          approval.state = 'consumed'
        end
        raw = cjson.encode(approval)
        redis.call('HSET', records, id, raw)
        return {'approved', raw}
      end
    end
    if approval.state == 'consumed' then
      -- Used up: that request is over, and not reported as expired.
      redis.call('HDEL', records, id)
      redis.call('ZREM', expiries, id)
    end
    -- An expired one stays for approval_expired.lua to report; either way the call
    -- needs a new request.
  end
end

local request = cjson.decode(ARGV[3])
local expires_ms = tonumber(ARGV[4])
redis.call('HSET', records, request.id, ARGV[3])
redis.call('HSET', bindings, binding, request.id)
redis.call('ZADD', expiries, expires_ms, request.id)
keep(expires_ms - now)
return {'created', ARGV[3]}
