-- One page of dead letters, oldest first: ARGV[2] = retention ms, ARGV[3]
-- = exclusive start id ('' = from the oldest kept), ARGV[4] = limit.
-- Returns the XRANGE reply (limit + 1 entries tell there is more).
local retention, after, limit = tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local start = tostring(now - retention)
if after ~= '' then
  local ms = tonumber(string.match(after, '^(%d+)'))
  if ms and ms >= now - retention then start = '(' .. after end
end
return redis.call('XRANGE', DEAD(), start, '+', 'COUNT', limit + 1)
