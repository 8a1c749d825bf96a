-- Takes or renews the housekeeping lease. KEYS[1] = leader key, ARGV[1] =
-- holder, ARGV[2] = ttl ms. Returns 1 when ARGV[1] leads.
local cur = redis.call('GET', KEYS[1])
if cur == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
elseif cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
