-- Settles deliveries of one queue. ARGV[1] = unique prefix, ARGV[2] = n,
-- ARGV[3] = dead-letter retention ms, then per settlement 9 values: kind
-- ('a' ack, 'r' retry, 'l' release, 'd' dead letter, 'g' dead letter of
-- bytes that are not an envelope), level, entry id, fence, after_ms,
-- payload ('' = the stored one), reason, error ('' = none), task id.
-- Returns per settlement 1 (done) or 0 (lease lost).
local prefix, n, retention = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
for k = 0, n - 1 do
  local b = 4 + k * 9
  local kind, level, id, fence = ARGV[b], tonumber(ARGV[b + 1]), ARGV[b + 2], ARGV[b + 3]
  local after, payload, reason, err = tonumber(ARGV[b + 4]), ARGV[b + 5], ARGV[b + 6], ARGV[b + 7]
  local sk, lk = stream(level), leases(level)
  local member = id .. '|' .. fence
  if not redis.call('ZSCORE', lk, member) then
    out[k + 1] = 0
  else
    local entry = redis.call('XRANGE', sk, id, id)
    local f = {}
    if entry[1] then f = fields_of(entry[1][2]) end
    redis.call('ZREM', lk, member)
    redis.call('XACK', sk, 'stem', id)
    redis.call('XDEL', sk, id)
    local u, i, o = f['u'] or '', f['i'] or '', f['o'] or '0'
    if payload == '' then payload = f['e'] or '' end
    if kind == 'a' then
      if o == '1' then release_unique(prefix, u, i) end
    elseif kind == 'r' or kind == 'l' then
      local d = tostring(tonumber(f['d'] or '0') + tonumber(fence))
      if after > 0 then
        add_delayed(level, d, o, i, u, payload, after)
      else
        add_ready(level, d, o, i, u, payload)
      end
    else
      local task = ARGV[b + 8]
      local garbage = '0'
      if kind == 'g' then garbage = '1' end
      local did = redis.call('XADD', DEAD(), 'MINID', '~', now - retention, '*',
        'i', task, 'r', reason, 'x', err, 'e', payload, 'g', garbage)
      redis.call('HSET', DEADIDX(), task, did)
      if o == '1' then release_unique(prefix, u, i) end
    end
    out[k + 1] = 1
  end
end
return out
