-- Writes a task record unless the monotonic rule of R1 forbids it, the
-- rule of `TaskRecord::may_replace`: a terminal record is never replaced,
-- an earlier attempt never replaces a later one, and `pending` never
-- replaces a task that has started. An absent (or expired) record never
-- blocks a write. A terminal write is announced on the task's done
-- channel, in the same script, so a waiter that subscribed before it read
-- the record cannot miss it.
--
-- For each record i (one or many per call; on a cluster one per call,
-- since records lie in different slots):
-- KEYS[i]  the record hash (fields s state, t terminal 0/1, a attempts, j JSON)
-- ARGV[6(i-1)+1]  state name (`pending`, `started`, ...)
-- ARGV[6(i-1)+2]  1 when the state is terminal, else 0
-- ARGV[6(i-1)+3]  attempts (a whole number)
-- ARGV[6(i-1)+4]  the record as JSON
-- ARGV[6(i-1)+5]  time to keep it, ms (>= 1)
-- ARGV[6(i-1)+6]  the done channel (a channel name, not a key)
--
-- Returns per record, in order: 1 written, 0 refused by the rule, -1 the
-- stored record is not one Stem wrote (wrong type, missing or malformed
-- fields): nothing written for it.
-- No TIME needed: expiry is the key's own, relative to Redis's clock.
local function store(key, state, terminal, attempts, json, ttl, channel)
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
  if tonumber(attempts) < old_attempts then
    return 0
  end
  if state == 'pending' and old[1] ~= 'pending' then
    return 0
  end
end
redis.call('HSET', key, 's', state, 't', terminal, 'a', attempts, 'j', json)
redis.call('PEXPIRE', key, ttl)
if terminal == '1' then
  redis.call('PUBLISH', channel, '1')
end
return 1
end

local out = {}
for i = 1, #KEYS do
  local b = 6 * (i - 1)
  out[i] = store(KEYS[i], ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4], ARGV[b + 5], ARGV[b + 6])
end
return out
