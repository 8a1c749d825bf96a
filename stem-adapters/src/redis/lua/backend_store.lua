-- Writes a task record unless the monotonic rule of R1 forbids it, the
-- rule of `TaskRecord::may_replace`: a terminal record is never replaced,
-- an earlier attempt never replaces a later one, and `pending` never
-- replaces a task that has started. An absent (or expired) record never
-- blocks a write. A terminal write is announced on the task's done
-- channel, in the same script, so a waiter that subscribed before it read
-- the record cannot miss it.
--
-- KEYS[1]  the record hash (fields s state, t terminal 0/1, a attempts, j JSON)
-- ARGV[1]  state name (`pending`, `started`, ...)
-- ARGV[2]  1 when the state is terminal, else 0
-- ARGV[3]  attempts (a whole number)
-- ARGV[4]  the record as JSON
-- ARGV[5]  time to keep it, ms (>= 1)
-- ARGV[6]  the done channel (a channel name, not a key)
--
-- Returns 1 written, 0 refused by the rule, -1 the stored record is not
-- one Stem wrote (wrong type, missing or malformed fields): nothing written.
-- No TIME needed: expiry is the key's own, relative to Redis's clock.
local key = KEYS[1]
local kind = redis.call('TYPE', key).ok
if kind ~= 'none' then
  if kind ~= 'hash' then
    return -1
  end
  local old = redis.call('HMGET', key, 's', 't', 'a')
  local old_attempts = tonumber(old[3])
  if not old[1] or (old[2] ~= '0' and old[2] ~= '1') or not old_attempts then
    return -1
  end
  if old[2] == '1' then
    return 0
  end
  if tonumber(ARGV[3]) < old_attempts then
    return 0
  end
  if ARGV[1] == 'pending' and old[1] ~= 'pending' then
    return 0
  end
end
redis.call('HSET', key, 's', ARGV[1], 't', ARGV[2], 'a', ARGV[3], 'j', ARGV[4])
redis.call('PEXPIRE', key, ARGV[5])
if ARGV[2] == '1' then
  redis.call('PUBLISH', ARGV[6], '1')
end
return 1
