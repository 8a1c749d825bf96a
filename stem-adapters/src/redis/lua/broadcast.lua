-- Appends a broadcast message: KEYS[1] = channel stream, ARGV[1] =
-- payload. Messages older than 5 minutes are trimmed.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('XADD', KEYS[1], 'MINID', '~', now - 300000, '*', 'p', ARGV[1])
