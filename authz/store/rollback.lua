-- Return the budget one window.lua call recorded: remove exactly the members it added.
--
-- Used by the Redis Cluster store when a request's charges span several hash slots: each
-- slot is reserved by its own window.lua call, and when a later slot refuses (or fails),
-- the earlier reservations are undone here. Takes the same KEYS and ARGV as that
-- window.lua call (ARGV[1], the time, is unused), so the members it recorded,
-- "<cost>:<nonce>:<i>", are known exactly. A session charge spent either its own keys or
-- its grant's (whether its session was recorded then): both are tried. Removing a member
-- that is not there (never recorded, already expired, already rolled back) changes
-- nothing, so running this twice, or for a call whose reservation never ran, is safe.
-- Returns how many members it removed.

local nonce = ARGV[2]
local removed = 0

local function remove(zkey, tkey, member, cost)
  if redis.call('ZREM', zkey, member) == 1 then
    removed = removed + 1
    if redis.call('EXISTS', zkey) == 0 then
      redis.call('DEL', tkey)
    elseif redis.call('EXISTS', tkey) == 1 then
      -- A missing total is recounted from the set by the next window.lua call.
      redis.call('DECRBY', tkey, cost)
    end
  end
end

local cursor = 1
for i = 1, (#ARGV - 2) / 4 do
  local cost = ARGV[4 * i + 1]
  local member = cost .. ':' .. nonce .. ':' .. i
  remove(KEYS[cursor], KEYS[cursor + 1], member, cost)
  cursor = cursor + 2
  if ARGV[4 * i + 2] == '1' then
    remove(KEYS[cursor + 1], KEYS[cursor + 2], member, cost)
    cursor = cursor + 3
  end
end
return removed
