-- Creates a group (R4) with its optional chord callback (R5), unless a
-- group with this id exists: then nothing changes, so a retried create can
-- never re-arm a chord that already fired.
--
-- KEYS[1]  meta hash (n distinct members, fired 0/1, cb callback bytes)
-- KEYS[2]  members list, in the order added
-- KEYS[3]  done set (member ids seen terminal; filled by backend_group_finish)
-- ARGV[1]  time to keep the group, ms (>= 1)
-- ARGV[2]  number of distinct members
-- ARGV[3]  1 when there is a callback, else 0
-- ARGV[4]  the encoded callback envelope (empty without one)
-- ARGV[5..] the member ids in order
--
-- Returns 1 created, 0 the group existed (left as it was).
-- No TIME needed: expiry is the keys' own.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
-- Leftovers of an expired group (the keys expire together; this is a guard).
redis.call('DEL', KEYS[2], KEYS[3])
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], 'n', ARGV[2], 'fired', '0', 'cb', ARGV[4])
else
  redis.call('HSET', KEYS[1], 'n', ARGV[2], 'fired', '0')
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
-- RPUSH in chunks of at most 1000: `unpack` of an unbounded table fails.
local first = 5
while first <= #ARGV do
  local last = math.min(first + 999, #ARGV)
  redis.call('RPUSH', KEYS[2], unpack(ARGV, first, last))
  first = last + 1
end
if #ARGV >= 5 then
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
end
return 1
