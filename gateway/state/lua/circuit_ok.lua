-- The channel worked: its circuit is forgotten. Returns the new circuits version.
redis.call('DEL', KEYS[1])
return move_circuits_version()
