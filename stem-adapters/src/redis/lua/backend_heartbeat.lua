-- Records a worker heartbeat (R6): the worker's report, and when Redis
-- saw it by Redis's own clock.
--
-- KEYS[1]  workers hash: worker id -> heartbeat JSON
-- KEYS[2]  seen zset: worker id scored by last-seen ms (server TIME)
-- ARGV[1]  worker id
-- ARGV[2]  heartbeat JSON
--
-- Returns the last-seen time written, ms.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[1])
return now
