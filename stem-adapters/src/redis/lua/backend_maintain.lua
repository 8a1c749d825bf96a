-- Forgets workers silent for longer than the retention (by Redis's clock),
-- at most ARGV[2] of them per call.
--
-- KEYS[1]  workers hash
-- KEYS[2]  seen zset
-- ARGV[1]  retention, ms
-- ARGV[2]  most workers dropped by this call (<= 1000)
--
-- Returns how many were dropped.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[2])
if limit > 1000 then
  limit = 1000
end
local cutoff = string.format('%d', now - tonumber(ARGV[1]))
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cutoff, 'LIMIT', 0, limit)
if #old == 0 then
  return 0
end
redis.call('HDEL', KEYS[1], unpack(old))
redis.call('ZREM', KEYS[2], unpack(old))
return #old
