-- Prepended to every script that changes a circuit (KEYS[1]): moves the circuits version KEYS[2] (started at the
-- random ARGV[1] where there is none, so an emptied Redis never counts back up to a version a process still holds),
-- publishes it on the versions channel ARGV[2] as "circuits <version>" and returns it.
local function move_circuits_version()
  redis.call('SET', KEYS[2], ARGV[1], 'NX')
  local version = redis.call('INCR', KEYS[2])
  redis.call('PUBLISH', ARGV[2], 'circuits ' .. version)
  return version
end
