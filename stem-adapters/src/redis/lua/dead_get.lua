-- The live dead letter of one task in this queue: ARGV[2] = retention ms,
-- ARGV[3] = task id. Returns the XRANGE reply of its entry (empty when
-- the task has none here, or it is past the retention).
local retention, task = tonumber(ARGV[2]), ARGV[3]
local did = redis.call('HGET', DEADIDX(), task)
if not did then return {} end
local ms = tonumber(string.match(did, '^(%d+)'))
if not ms or ms < now - retention then return {} end
return redis.call('XRANGE', DEAD(), did, did)
