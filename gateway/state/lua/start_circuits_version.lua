-- The circuits version KEYS[1] where there is none (a new Redis, or one emptied while processes listen: they still
-- hold the old one, and learn the new one from its message on ARGV[2]). Returns the version.
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then redis.call('PUBLISH', ARGV[2], 'circuits ' .. ARGV[1]) end
return redis.call('GET', KEYS[1])
