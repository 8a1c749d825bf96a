-- The atomic half of `member_finished` (R5): records the member ids the
-- caller saw terminal, and hands the chord callback out exactly once, to
-- the call that finds every distinct member done.
--
-- KEYS[1]  meta hash (n, fired, cb)
-- KEYS[2]  done set
-- ARGV[1..] member ids the caller saw terminal (at most 1000; may be none)
--
-- Returns 0: nothing to hand out (unknown or expired group, already fired,
-- or not complete); {1} fired, no callback; {1, cb} fired with its
-- callback; -1 the meta hash is not one Stem wrote.
-- No TIME needed: the done set takes the meta hash's remaining TTL.
local kind = redis.call('TYPE', KEYS[1]).ok
if kind == 'none' then
  return 0
end
if kind ~= 'hash' then
  return -1
end
local meta = redis.call('HMGET', KEYS[1], 'n', 'fired', 'cb')
local n = tonumber(meta[1])
if not n then
  return -1
end
if meta[2] == '1' then
  return 0
end
if #ARGV > 0 then
  if #ARGV > 1000 then
    return redis.error_reply('ERR stem: at most 1000 member ids per call')
  end
  redis.call('SADD', KEYS[2], unpack(ARGV))
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then
    redis.call('PEXPIRE', KEYS[2], ttl)
  end
end
if redis.call('SCARD', KEYS[2]) < n then
  return 0
end
redis.call('HSET', KEYS[1], 'fired', '1')
if meta[3] then
  return {1, meta[3]}
end
return {1}
