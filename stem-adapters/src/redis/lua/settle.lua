-- Settles deliveries of one queue. ARGV[1] = unique prefix, ARGV[2] = n,
-- ARGV[3] = dead-letter retention ms, then per settlement 12 values: kind
-- ('a' ack, 'r' retry, 'l' release, 'd' dead letter, 'g' dead letter of
-- bytes that are not an envelope), level, entry id, fence, after_ms,
-- payload (the envelope to store next: retry, release, dead letter),
-- reason, error ('' = none), task id, escaped unique key ('' = none),
-- on-finish flag, base deliveries of the copy (retry, release).
-- Returns per settlement 1 (done) or 0 (lease lost).
--
-- Fenced in two steps per level: ZMSCORE of every member (a missing one
-- is a lost lease and changes nothing), then one ZREM, XACK and XDEL for
-- all that were held; copies and dead letters are written in between.
local prefix, n, retention = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local W = 12
local out = {}
local by_level = {}
for k = 0, n - 1 do
  local level = tonumber(ARGV[4 + k * W + 1])
  local l = by_level[level]
  if not l then l = {}; by_level[level] = l end
  table.insert(l, k)
end
for level, items in pairs(by_level) do
  local sk, lk = stream(level), leases(level)
  local members = {}
  for j, k in ipairs(items) do
    local b = 4 + k * W
    members[j] = ARGV[b + 2] .. '|' .. ARGV[b + 3]
  end
  local held, ids = {}, {}
  for c = 1, #members, 500 do
    local chunk = {}
    for j = c, math.min(c + 499, #members) do chunk[#chunk + 1] = members[j] end
    local scores = redis.call('ZMSCORE', lk, unpack(chunk))
    for j = 1, #chunk do
      local k = items[c + j - 1]
      if scores[j] then
        held[#held + 1] = chunk[j]
        ids[#ids + 1] = ARGV[4 + k * W + 2]
        out[k + 1] = 1
      else
        out[k + 1] = 0
      end
    end
  end
  for c = 1, #held, 500 do
    local hm, hi = {}, {}
    for j = c, math.min(c + 499, #held) do hm[#hm + 1] = held[j]; hi[#hi + 1] = ids[j] end
    redis.call('ZREM', lk, unpack(hm))
    redis.call('XACK', sk, 'stem', unpack(hi))
    redis.call('XDEL', sk, unpack(hi))
  end
  for _, k in ipairs(items) do
    if out[k + 1] == 1 then
      local b = 4 + k * W
      local kind, after, payload = ARGV[b], tonumber(ARGV[b + 4]), ARGV[b + 5]
      local reason, err, task = ARGV[b + 6], ARGV[b + 7], ARGV[b + 8]
      local u, o, d = ARGV[b + 9], ARGV[b + 10], ARGV[b + 11]
      if kind == 'a' then
        if o == '1' then release_unique(prefix, u, task) end
      elseif kind == 'r' or kind == 'l' then
        local i = ''
        if u ~= '' then i = task end
        if after > 0 then
          add_delayed(level, d, o, i, u, payload, after)
        else
          add_ready(level, d, o, i, u, payload)
        end
      else
        local garbage = '0'
        if kind == 'g' then garbage = '1' end
        local did = redis.call('XADD', DEAD(), 'MINID', '~', now - retention, '*',
          'i', task, 'r', reason, 'x', err, 'e', payload, 'g', garbage)
        redis.call('HSET', DEADIDX(), task, did)
        if o == '1' then release_unique(prefix, u, task) end
      end
    end
  end
end
return out
