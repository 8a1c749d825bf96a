-- Lists heartbeats with their last-seen times and Redis's now, read at
-- one instant, so liveness (R6) is judged by the server's clock alone.
--
-- KEYS[1]  workers hash
-- KEYS[2]  seen zset
--
-- Returns {now ms, {id, json, ...}, {id, seen ms, ...}}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return {now, redis.call('HGETALL', KEYS[1]), redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')}
