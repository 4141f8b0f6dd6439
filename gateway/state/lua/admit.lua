-- A window and a lease, both or neither; an empty key name skips that limit.
-- Window KEYS[1]: ARGV[1] counted against the limit ARGV[2], the key kept ARGV[3] s.
-- Lease KEYS[2]: places expire at their score; ARGV[4] is now, ARGV[5] the limit, ARGV[6] the new place's expiry and
-- ARGV[7] its holder, the key kept ARGV[8] s.
-- Returns 0 (admitted), 1 (the window is full) or 2 (every place is taken).
if KEYS[1] ~= '' and tonumber(redis.call('GET', KEYS[1]) or '0') + tonumber(ARGV[1]) > tonumber(ARGV[2]) then
  return 1
end
if KEYS[2] ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[4])
  if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then return 2 end
  redis.call('ZADD', KEYS[2], ARGV[6], ARGV[7])
  redis.call('EXPIRE', KEYS[2], ARGV[8])
end
if KEYS[1] ~= '' then
  redis.call('INCRBY', KEYS[1], ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
return 0
