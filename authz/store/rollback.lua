-- Return the budget one window.lua call recorded: remove exactly the members it added.
--
-- Used by the Redis Cluster store when a request's charges span several hash slots: each
-- slot is reserved by its own window.lua call, and when a later slot refuses (or fails),
-- the earlier reservations are undone here. Takes the same KEYS and ARGV as that
-- window.lua call (ARGV[1], the time, is unused), so the members it recorded,
-- "<cost>:<nonce>:<i>", are known exactly. Removing a member that is not there (never
-- recorded, already expired, already rolled back) changes nothing, so running this twice,
-- or for a call whose reservation never ran, is safe.
-- Returns how many members it removed.

local nonce = ARGV[2]
local removed = 0
for i = 1, #KEYS / 2 do
  local zkey, tkey = KEYS[2 * i - 1], KEYS[2 * i]
  local cost = ARGV[3 * i + 2]
  if redis.call('ZREM', zkey, cost .. ':' .. nonce .. ':' .. i) == 1 then
    removed = removed + 1
    if redis.call('EXISTS', zkey) == 0 then
      redis.call('DEL', tkey)
    elseif redis.call('EXISTS', tkey) == 1 then
      -- A missing total is recounted from the set by the next window.lua call.
      redis.call('DECRBY', tkey, cost)
    end
  end
end
return removed
