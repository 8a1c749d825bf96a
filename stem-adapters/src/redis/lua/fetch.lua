-- Leases up to ARGV[3] envelopes of one queue for consumer ARGV[2], each
-- for ARGV[4] ms: first moves due delayed envelopes to their streams
-- (at most ARGV[5]), then per level from 9 down to 0 takes expired leases
-- again (fence + 1) and then fresh entries (fence 1). ARGV[1] = unique
-- prefix (unused here, kept for the calling convention).
-- Returns {1, level, id, fence, d, payload, ...} when it leased something,
-- else {0, bound_ms (-1 = none), last id of p0..p9, last id of timer}.
local consumer, max, lease, promote = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local due = redis.call('ZRANGEBYSCORE', DELAYED(), '-inf', now, 'LIMIT', 0, promote)
for _, m in ipairs(due) do
  local level, d, o, i, u, payload = parse_delayed(m)
  add_ready(level, d, o, i, u, payload)
  redis.call('ZREM', DELAYED(), m)
end
local out = {1}
-- The new deadline as text once: a number handed to redis.call is
-- formatted per call.
local deadline = string.format('%d', now + lease)
local remaining = max
local meta_lease = tonumber(redis.call('HGET', META(), 'maxlease') or '0')
if lease > meta_lease then redis.call('HSET', META(), 'maxlease', lease) end
for level = 9, 0, -1 do
  if remaining <= 0 then break end
  local sk, lk = stream(level), leases(level)
  local expired = redis.call('ZRANGEBYSCORE', lk, '-inf', now, 'LIMIT', 0, remaining)
  for _, m in ipairs(expired) do
    local bar = string.find(m, '|', 1, true)
    local id, fence = string.sub(m, 1, bar - 1), tonumber(string.sub(m, bar + 1))
    redis.call('ZREM', lk, m)
    local c = redis.call('XCLAIM', sk, 'stem', consumer, 0, id, 'RETRYCOUNT', fence + 1)
    if c[1] then
      redis.call('ZADD', lk, deadline, id .. '|' .. (fence + 1))
      local f = fields_of(c[1][2])
      table.insert(out, level); table.insert(out, id); table.insert(out, fence + 1)
      table.insert(out, f['d'] or '0'); table.insert(out, f['e'] or '')
      remaining = remaining - 1
    end
  end
  if remaining > 0 and redis.call('EXISTS', sk) == 1 then
    local r = redis.pcall('XREADGROUP', 'GROUP', 'stem', consumer, 'COUNT', remaining, 'STREAMS', sk, '>')
    if type(r) == 'table' and r.err then
      ensure_group(level)
      r = redis.call('XREADGROUP', 'GROUP', 'stem', consumer, 'COUNT', remaining, 'STREAMS', sk, '>')
    end
    if r and r[1] then
      local zargs = {'+inf', SENTINEL}
      for _, e in ipairs(r[1][2]) do
        local id, f = e[1], e[2]
        zargs[#zargs + 1] = deadline
        zargs[#zargs + 1] = id .. '|1'
        -- Fields are written `e` first, then `d` when present.
        local d = '0'
        if f[3] == 'd' then d = f[4] end
        out[#out + 1] = level; out[#out + 1] = id; out[#out + 1] = 1
        out[#out + 1] = d; out[#out + 1] = f[2] or ''
        remaining = remaining - 1
      end
      for c = 1, #zargs, 1000 do
        redis.call('ZADD', lk, unpack(zargs, c, math.min(c + 999, #zargs)))
      end
    end
  end
end
if #out > 1 then return out end
-- Nothing: tell the caller how long it may sleep and from where to watch.
local bound = -1
local first = redis.call('ZRANGE', DELAYED(), 0, 0, 'WITHSCORES')
if first[2] then bound = tonumber(first[2]) - now end
for level = 0, 9 do
  local l = redis.call('ZRANGE', leases(level), 0, 0, 'WITHSCORES')
  if l[2] and l[1] ~= SENTINEL then
    local b = tonumber(l[2]) - now
    if bound < 0 or b < bound then bound = b end
  end
end
if bound ~= -1 and bound < 0 then bound = 0 end
local reply = {0, bound}
for level = 0, 9 do
  local last = redis.call('XREVRANGE', stream(level), '+', '-', 'COUNT', 1)
  table.insert(reply, last[1] and last[1][1] or '0-0')
end
local lt = redis.call('XREVRANGE', TIMER(), '+', '-', 'COUNT', 1)
table.insert(reply, lt[1] and lt[1][1] or '0-0')
return reply
