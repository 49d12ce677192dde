-- An operator's decision on a pending request, or the refund of a consumed use.
--
-- KEYS: records, bindings, expiries (see approval_gate.lua)
-- ARGV: op (approve | reject | refund), id, now (ms), operator, reason
-- Returns {'missing'} when no live request has this id, else {status, approval JSON} with
-- status 'ok', or 'conflict' when the request was already decided.

local records, expiries = KEYS[1], KEYS[3]
local op, id, now = ARGV[1], ARGV[2], tonumber(ARGV[3])

local raw = redis.call('HGET', records, id)
if not raw then
  return {'missing'}
end
local approval = cjson.decode(raw)

if op == 'refund' then
  if approval.state == 'approved' or approval.state == 'consumed' then
    approval.uses_left = approval.uses_left + 1
    approval.state = 'approved'
    raw = cjson.encode(approval)
    redis.call('HSET', records, id, raw)
  end
  return {'ok', raw}
end

if approval.expires_at * 1000 <= now then
  return {'missing'}
end
if approval.state ~= 'pending' then
  return {'conflict', raw}
end
approval.operator = ARGV[4]
approval.decided_at = now / 1000
if op == 'approve' then
  -- An approved call may be made `uses` times within a fresh ttl (the rule's) from now.
  local expires_ms = now + math.floor(approval.ttl_s * 1000)
  approval.state = 'approved'
  approval.expires_at = expires_ms / 1000
  redis.call('ZADD', expiries, expires_ms, id)
else
  approval.state = 'rejected'
  approval.reason = ARGV[5]
end
raw = cjson.encode(approval)
redis.call('HSET', records, id, raw)
return {'ok', raw}
