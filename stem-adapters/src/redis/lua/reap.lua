-- Housekeeping of one queue (run by the leader): pending entries idle
-- longer than ARGV[2] ms with no lease member (their consumer died inside
-- a script, or state was lost) get an expired member so the next fetch
-- hands them out through the fenced path; consumers with nothing pending
-- idle longer than ARGV[3] ms leave the group; expired dead letters go.
-- ARGV[4] = dead-letter retention ms. Bounded: 100 entries per level.
local floor, idle_limit, retention = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local maxlease = tonumber(redis.call('HGET', META(), 'maxlease') or '0')
local min_idle = math.max(floor, 2 * maxlease)
local fixed, removed = 0, 0
for level = 0, 9 do
  local sk, lk = stream(level), leases(level)
  if redis.call('EXISTS', sk) == 1 then
    local cursor = redis.call('HGET', META(), 'reap' .. level) or '0-0'
    local r = redis.pcall('XAUTOCLAIM', sk, 'stem', 'stem-reaper', min_idle, cursor, 'COUNT', 100, 'JUSTID')
    if type(r) == 'table' and not r.err then
      redis.call('HSET', META(), 'reap' .. level, r[1])
      for _, id in ipairs(r[2]) do
        local p = redis.call('XPENDING', sk, 'stem', id, id, 1)
        local count = p[1] and tonumber(p[1][4]) or 1
        local has = false
        for f = count - 2, count + 1 do
          if f >= 1 and redis.call('ZSCORE', lk, id .. '|' .. f) then has = true end
        end
        if not has then
          redis.call('ZADD', lk, now - 1, id .. '|' .. count)
          fixed = fixed + 1
        end
      end
      local consumers = redis.call('XINFO', 'CONSUMERS', sk, 'stem')
      for _, c in ipairs(consumers) do
        local info = fields_of(c)
        if tonumber(info['pending']) == 0 and tonumber(info['idle']) > idle_limit then
          redis.call('XGROUP', 'DELCONSUMER', sk, 'stem', info['name'])
          removed = removed + 1
        end
      end
    end
  end
end
local old = redis.call('XRANGE', DEAD(), '-', '(' .. (now - retention), 'COUNT', 1000)
for _, e in ipairs(old) do
  local f = fields_of(e[2])
  if f['i'] and redis.call('HGET', DEADIDX(), f['i']) == e[1] then redis.call('HDEL', DEADIDX(), f['i']) end
  redis.call('XDEL', DEAD(), e[1])
end
return {fixed, removed}
