-- Shared by every queue script (prepended by scripts.rs).
-- KEYS[1..10] = streams p0..p9, KEYS[11..20] = lease sets l0..l9,
-- KEYS[21] = delayed, KEYS[22] = timer, KEYS[23] = dead,
-- KEYS[24] = deadidx, KEYS[25] = meta. Unique keys are KEYS' slot-mates
-- named by a prefix passed in ARGV[1] plus the escaped key. A script over
-- several queues (publish) passes 25 keys per queue and sets QB to the
-- offset of the queue it works on.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local QB = 0
local function stream(level) return KEYS[QB + level + 1] end
local function leases(level) return KEYS[QB + level + 11] end
local function DELAYED() return KEYS[QB + 21] end
local function TIMER() return KEYS[QB + 22] end
local function DEAD() return KEYS[QB + 23] end
local function DEADIDX() return KEYS[QB + 24] end
local function META() return KEYS[QB + 25] end
-- Every lease set holds this member at score +inf: longer than
-- zset-max-listpack-value (64 bytes), it keeps the set a skiplist, whose
-- lookups are O(log n), instead of a listpack scanned on every lookup.
-- Never expired, never a lease; counts exclude +inf.
local SENTINEL = '~stem-lease-set-kept-as-a-skiplist-by-this-member-of-more-than-64-bytes~'

-- The fields of a stream entry's flat field list as a table.
local function fields_of(flat)
  local f = {}
  for j = 1, #flat, 2 do f[flat[j]] = flat[j + 1] end
  return f
end

-- A delayed member: `level|d|o|i|seq|u` then a newline, then the payload.
local function delayed_member(level, d, o, i, u, payload)
  local seq = redis.call('HINCRBY', META(), 'seq', 1)
  return level .. '|' .. d .. '|' .. o .. '|' .. i .. '|' .. seq .. '|' .. u .. '\n' .. payload
end

local function parse_delayed(m)
  local nl = string.find(m, '\n', 1, true)
  local level, d, o, i, _, u = string.match(string.sub(m, 1, nl - 1), '^(%d)|(%d+)|(%d)|([^|]*)|(%d+)|(.*)$')
  return tonumber(level), d, o, i, u, string.sub(m, nl + 1)
end

-- Appends an entry to a level's stream.
local function add_ready(level, d, o, i, u, payload)
  if u ~= '' then
    if d ~= '0' then
      return redis.call('XADD', stream(level), '*', 'e', payload, 'd', d, 'u', u, 'i', i, 'o', o)
    end
    return redis.call('XADD', stream(level), '*', 'e', payload, 'u', u, 'i', i, 'o', o)
  end
  if d ~= '0' then
    return redis.call('XADD', stream(level), '*', 'e', payload, 'd', d)
  end
  return redis.call('XADD', stream(level), '*', 'e', payload)
end

-- Schedules an entry `after_ms` from now; wakes sleepers when it is now
-- the earliest due time.
local function add_delayed(level, d, o, i, u, payload, after_ms)
  local due = now + after_ms
  local first = redis.call('ZRANGE', DELAYED(), 0, 0, 'WITHSCORES')
  redis.call('ZADD', DELAYED(), due, delayed_member(level, d, o, i, u, payload))
  if first[2] == nil or tonumber(first[2]) > due then
    redis.call('XADD', TIMER(), 'MAXLEN', 1, '*', 'w', '1')
  end
end

-- Frees a unique key when `holder` still holds it.
local function release_unique(prefix, u, holder)
  if u ~= nil and u ~= '' then
    local k = prefix .. u
    if redis.call('GET', k) == holder then redis.call('DEL', k) end
  end
end

-- Makes sure the consumer group of a level's stream exists.
local function ensure_group(level)
  local ok = redis.pcall('XGROUP', 'CREATE', stream(level), 'stem', '0', 'MKSTREAM')
  return ok
end
