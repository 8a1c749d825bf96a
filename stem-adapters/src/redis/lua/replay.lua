-- Moves one dead letter back to its queue. ARGV[2] = dead entry id,
-- ARGV[3] = task id, ARGV[4] = payload to store, ARGV[5] = level,
-- ARGV[6] = escaped unique key ('' = none), ARGV[7] = unique window ms
-- left by the producer's clock (<= 0: the window is over), ARGV[8] =
-- on-finish flag, ARGV[9] = retention ms. Returns 1 when replayed, 0 when
-- the entry is gone (replayed or expired meanwhile).
local prefix, did, task, payload = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local level, u, window, o, retention = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7]), ARGV[8], tonumber(ARGV[9])
local e = redis.call('XRANGE', DEAD(), did, did)
if not e[1] then return 0 end
local ms = tonumber(string.match(did, '^(%d+)'))
if ms < now - retention then return 0 end
redis.call('XDEL', DEAD(), did)
if redis.call('HGET', DEADIDX(), task) == did then redis.call('HDEL', DEADIDX(), task) end
local held = ''
if u ~= '' and window > 0 then
  if redis.call('SET', prefix .. u, task, 'NX', 'PX', window) then held = u end
end
if held == '' then o = '0' end
add_ready(level, '0', o, task, held, payload)
return 1
