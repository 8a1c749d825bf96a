-- `backend_store.lua` for many records in one call, on a standalone
-- Redis (the records lie in different slots, so a cluster runs
-- `backend_store.lua` per record instead). KEYS[i] is record i's hash,
-- ARGV[6 * (i - 1) + 1 .. 6 * i] its six values as in `backend_store.lua`.
-- Returns one answer per record, in order (1 written, 0 refused, -1 not a
-- Stem record).
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
