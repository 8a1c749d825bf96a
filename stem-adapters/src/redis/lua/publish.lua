-- Stores envelopes of one or more queues in one atomic call. KEYS = 25
-- keys per queue. ARGV[1] = number of queues m, ARGV[2..m+1] = their
-- unique prefixes, ARGV[m+2] = n, then per envelope 8 values: queue index
-- (0-based), payload, level, delay_ms, window_ms, escaped unique key
-- ('' = none), task id, on-finish flag ('1'/'0').
-- Returns per envelope '' (stored) or the holder's task id (duplicate).
local m = tonumber(ARGV[1])
local n = tonumber(ARGV[m + 2])
local out = {}
for k = 0, n - 1 do
  local b = m + 3 + k * 8
  local q = tonumber(ARGV[b])
  QB = q * 25
  local prefix = ARGV[2 + q]
  local payload, level, delay, window = ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  local u, i, o = ARGV[b + 5], ARGV[b + 6], ARGV[b + 7]
  local holder = nil
  if u ~= '' then
    if not redis.call('SET', prefix .. u, i, 'NX', 'PX', window) then
      holder = redis.call('GET', prefix .. u)
    end
  end
  if holder then
    out[k + 1] = holder
  else
    if delay > 0 then
      add_delayed(level, '0', o, i, u, payload, delay)
    else
      add_ready(level, '0', o, i, u, payload)
    end
    out[k + 1] = ''
  end
end
return out
