-- Take the approvals whose time ran out: each is returned to exactly one caller (the
-- replicas all poll), then forgotten.
--
-- KEYS: records, bindings, expiries (see approval_gate.lua)
-- ARGV[1]  now (ms)   ARGV[2]  most approvals to take in one call (bounds the script)
-- Returns the approvals' JSON. A used-up approval replaced by a new request for the same
-- call is gone already (approval_gate.lua), and not returned.

local records, bindings, expiries = KEYS[1], KEYS[2], KEYS[3]
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', expiries, '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])) do
  redis.call('ZREM', expiries, id)
  local raw = redis.call('HGET', records, id)
  if raw then
    redis.call('HDEL', records, id)
    local binding = cjson.decode(raw).binding
    if redis.call('HGET', bindings, binding) == id then
      redis.call('HDEL', bindings, binding)
    end
    out[#out + 1] = raw
  end
end
return out
