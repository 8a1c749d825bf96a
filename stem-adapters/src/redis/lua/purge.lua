-- Removes up to ARGV[2] ready or delayed envelopes of one queue (expired
-- leases count as ready), freeing their unique keys. Returns how many.
local prefix, limit = ARGV[1], tonumber(ARGV[2])
local removed = 0
local delayed = redis.call('ZRANGE', DELAYED(), 0, limit - 1)
for _, m in ipairs(delayed) do
  local _, _, _, i, u, _ = parse_delayed(m)
  release_unique(prefix, u, i)
  redis.call('ZREM', DELAYED(), m)
  removed = removed + 1
end
for level = 0, 9 do
  if removed >= limit then break end
  local sk, lk = stream(level), leases(level)
  local expired = redis.call('ZRANGEBYSCORE', lk, '-inf', now, 'LIMIT', 0, limit - removed)
  for _, m in ipairs(expired) do
    local id = string.sub(m, 1, string.find(m, '|', 1, true) - 1)
    local entry = redis.call('XRANGE', sk, id, id)
    if entry[1] then
      local f = fields_of(entry[1][2])
      release_unique(prefix, f['u'], f['i'])
    end
    redis.call('ZREM', lk, m)
    redis.call('XACK', sk, 'stem', id)
    redis.call('XDEL', sk, id)
    removed = removed + 1
  end
  if removed < limit and redis.call('EXISTS', sk) == 1 then
    local r = redis.pcall('XREADGROUP', 'GROUP', 'stem', 'stem-purge', 'COUNT', limit - removed, 'STREAMS', sk, '>')
    if type(r) == 'table' and r.err then
      ensure_group(level)
      r = redis.call('XREADGROUP', 'GROUP', 'stem', 'stem-purge', 'COUNT', limit - removed, 'STREAMS', sk, '>')
    end
    if r and r[1] then
      for _, e in ipairs(r[1][2]) do
        local f = fields_of(e[2])
        release_unique(prefix, f['u'], f['i'])
        redis.call('XACK', sk, 'stem', e[1])
        redis.call('XDEL', sk, e[1])
        removed = removed + 1
      end
    end
    redis.pcall('XGROUP', 'DELCONSUMER', sk, 'stem', 'stem-purge')
  end
end
return removed
