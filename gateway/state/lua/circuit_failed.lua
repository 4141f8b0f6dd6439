-- One channel fault: ARGV[3] is the threshold, ARGV[4] now, ARGV[5] the first cooldown and ARGV[6] the longest.
-- At the threshold, or when a probe failed, the circuit opens for a cooldown that doubles with each trip.
-- Returns {failures, trips, open_until or false, the new circuits version}.
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
local trips = tonumber(redis.call('HGET', KEYS[1], 'trips') or '0')
if redis.call('HEXISTS', KEYS[1], 'open_until') == 1 or failures >= tonumber(ARGV[3]) then
  trips = trips + 1
  local wait = math.min(tonumber(ARGV[5]) * 2 ^ (trips - 1), tonumber(ARGV[6]))
  redis.call('HSET', KEYS[1], 'trips', trips, 'failures', 0, 'open_until', tonumber(ARGV[4]) + wait)
  redis.call('HDEL', KEYS[1], 'probe_until')
  failures = 0
end
local version = move_circuits_version()
return {failures, trips, redis.call('HGET', KEYS[1], 'open_until') or false, version}
