-- Exact sliding-log limiter: check every charge of one request, then record all or none.
--
-- Running the whole check-and-record as one script makes it atomic across replicas and costs
-- one round trip. Requires Redis >= 5 (effects replication, so writes may follow TIME).
--
-- KEYS, per charge i (1-based), in order (a cursor walks them):
--   zkey   sorted set of accepted charges: score = time in ms,
--          member = "<cost>:<nonce>:<i>" (the nonce makes members unique across calls
--          and replicas, the cost prefix lets expiry subtract what it drops)
--   tkey   running sum of the costs in that set, so a check is O(log n + expired)
--          instead of O(n)
--   and, for a session charge only (its ARGV flag is 1), three more:
--   record the session's record (value: its idle time in ms), written when the upstream
--          issued the session id to this grant
--   fzkey, ftkey  the grant's counter of the same name, charged instead of zkey/tkey when
--          the session is not recorded (an id the upstream never issued to this grant)
--   All keys of a session charge carry the grant's hash tag: one Cluster slot.
-- ARGV:
--   [1]  now in ms, or "" to use the server clock (so replicas with skewed clocks agree)
--   [2]  nonce unique to this call
--   [4i-1], [4i], [4i+1], [4i+2]  window_ms, max, cost, session flag (1 or 0) of charge i
-- Returns a flat integer array:
--   {allowed (1 or 0), refused (0-based index, -1 when allowed), retry_after_ms,
--    remaining_1, ..., remaining_k}
--   When allowed, k is every charge and remaining_i = max - used - cost. When refused, k runs
--   up to and including the refused charge and remaining_i = max - used (nothing was spent),
--   floored at 0.

local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
else
  now = tonumber(ARGV[1])
end
local nonce = ARGV[2]
local n = (#ARGV - 2) / 4

-- The keys each charge spends: a session charge's own while its session is recorded (and
-- the use renews the record's idle time), else its grant's.
local zkeys, tkeys = {}, {}
local cursor = 1
for i = 1, n do
  zkeys[i], tkeys[i] = KEYS[cursor], KEYS[cursor + 1]
  cursor = cursor + 2
  if ARGV[4 * i + 2] == '1' then
    local record = KEYS[cursor]
    local idle = redis.call('GET', record)
    if idle then
      redis.call('PEXPIRE', record, idle)
    else
      zkeys[i], tkeys[i] = KEYS[cursor + 1], KEYS[cursor + 2]
    end
    cursor = cursor + 3
  end
end

local function cost_of(member)
  return tonumber(string.match(member, '^%d+'))
end

-- Drops the entries at or before cutoff and returns the cost still inside the window.
local function live_cost(zkey, tkey, cutoff)
  local expired = redis.call('ZRANGEBYSCORE', zkey, '-inf', cutoff)
  if #expired > 0 then
    redis.call('ZREMRANGEBYSCORE', zkey, '-inf', cutoff)
  end
  if redis.call('EXISTS', zkey) == 0 then
    -- Nothing live (or the set was evicted): the total restarts from zero.
    redis.call('DEL', tkey)
    return 0
  end
  local total = redis.call('GET', tkey)
  if not total then
    -- The total alone was lost (eviction): recount; the record step rewrites it.
    local sum = 0
    for _, member in ipairs(redis.call('ZRANGE', zkey, 0, -1)) do
      sum = sum + cost_of(member)
    end
    return sum
  end
  local freed = 0
  for _, member in ipairs(expired) do
    freed = freed + cost_of(member)
  end
  if freed > 0 then
    return redis.call('DECRBY', tkey, freed)
  end
  return tonumber(total)
end

-- Time until enough of the oldest entries expire for `cost` to fit under `max`.
local function retry_after(zkey, used, cost, max, window)
  if cost > max then
    return window
  end
  local need = used + cost - max
  local freed = 0
  local offset = 0
  local batch_size = 64
  while true do
    local batch = redis.call('ZRANGE', zkey, offset, offset + batch_size - 1, 'WITHSCORES')
    if #batch == 0 then
      return window
    end
    for j = 1, #batch, 2 do
      freed = freed + cost_of(batch[j])
      if freed >= need then
        return tonumber(batch[j + 1]) + window - now
      end
    end
    offset = offset + batch_size
  end
end

-- remaining[i] holds the budget before this request until every charge has fitted.
local used = {}
local remaining = {}
for i = 1, n do
  local zkey, tkey = zkeys[i], tkeys[i]
  local window = tonumber(ARGV[4 * i - 1])
  local max = tonumber(ARGV[4 * i])
  local cost = tonumber(ARGV[4 * i + 1])
  used[i] = live_cost(zkey, tkey, now - window)
  remaining[i] = math.max(max - used[i], 0)
  if used[i] + cost > max then
    return {0, i - 1, retry_after(zkey, used[i], cost, max, window), unpack(remaining)}
  end
end

for i = 1, n do
  local zkey, tkey = zkeys[i], tkeys[i]
  local window = ARGV[4 * i - 1]
  local cost = ARGV[4 * i + 1]
  redis.call('ZADD', zkey, now, cost .. ':' .. nonce .. ':' .. i)
  redis.call('PEXPIRE', zkey, window)
  redis.call('SET', tkey, used[i] + tonumber(cost), 'PX', window)
  remaining[i] = remaining[i] - tonumber(cost)
end
return {1, -1, 0, unpack(remaining)}
