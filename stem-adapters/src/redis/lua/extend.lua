-- Pushes leases to now + ARGV[2] ms. ARGV[1] = unique prefix (unused),
-- ARGV[3] = n, then per receipt: level, entry id, fence, consumer.
-- Returns per receipt 1 (extended) or 0 (lease lost).
local lease, n = tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
local deadline = string.format('%d', now + lease)
for k = 0, n - 1 do
  local b = 4 + k * 4
  local level, id, fence, consumer = tonumber(ARGV[b]), ARGV[b + 1], ARGV[b + 2], ARGV[b + 3]
  local member = id .. '|' .. fence
  if redis.call('ZSCORE', leases(level), member) then
    redis.call('ZADD', leases(level), 'XX', deadline, member)
    redis.call('XCLAIM', stream(level), 'stem', consumer, 0, id, 'JUSTID')
    out[k + 1] = 1
  else
    out[k + 1] = 0
  end
end
return out
