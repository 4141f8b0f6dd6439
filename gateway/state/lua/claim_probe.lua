-- A half-open circuit's one probe: ARGV[3] is now, ARGV[4] when the claim lapses. Returns the new circuits version
-- for the request that may probe, 0 for the others.
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '-1')
local probe_until = tonumber(redis.call('HGET', KEYS[1], 'probe_until') or '0')
if open_until < 0 or open_until > tonumber(ARGV[3]) or probe_until >= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], 'probe_until', ARGV[4])
return move_circuits_version()
