-- Counts of one queue: {ready, delayed, leased, dead}. ARGV[2] =
-- dead-letter retention ms. Expired leases and due delayed envelopes
-- count as ready. O(levels * log n), no scan.
local retention = tonumber(ARGV[2])
local ready, leased = 0, 0
for level = 0, 9 do
  local len = redis.call('XLEN', stream(level))
  local held = redis.call('ZCOUNT', leases(level), '-inf', '(+inf')
  local expired = redis.call('ZCOUNT', leases(level), '-inf', now)
  ready = ready + len - held + expired
  leased = leased + held - expired
end
local due = redis.call('ZCOUNT', DELAYED(), '-inf', now)
local delayed = redis.call('ZCARD', DELAYED()) - due
ready = ready + due
-- Dead letters past retention do not count (maintain removes them).
local dead = redis.call('XLEN', DEAD())
local old = redis.call('XRANGE', DEAD(), '-', '(' .. (now - retention), 'COUNT', 1000)
dead = dead - #old
return {ready, delayed, leased, dead}
