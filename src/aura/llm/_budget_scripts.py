"""The Lua of tenants' token budgets (``aura.llm.budgets``): one script per call that
settles earlier calls and reserves this one, and one that reads what tenants used.

A window's hash holds one field per bucket (``floor(t / size)`` -> tokens reserved in it).
A bucket counts while ``(index + 1) * size + window + allowance > now``: a call reserved
at ``t`` counts against every later call until at least ``t + window + allowance``.
"""

from __future__ import annotations

__all__ = ["RESERVE", "USAGE"]

# Time, and the live buckets of one window (oldest first), their sum; stale ones dropped
# when ``prune`` (the reader leaves them: reading changes nothing).
_COMMON = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function live(key, window, size, allowance, prune)
  local fields = redis.call('HGETALL', key)
  local buckets, used, stale = {}, 0, {}
  for i = 1, #fields, 2 do
    local index, tokens = tonumber(fields[i]), tonumber(fields[i + 1])
    if (index + 1) * size + window + allowance > now then
      buckets[#buckets + 1] = {index, tokens}
      used = used + tokens
    else
      stale[#stale + 1] = fields[i]
    end
  end
  if prune and #stale > 0 then
    redis.call('HDEL', key, unpack(stale))
  end
  return used, buckets
end
"""

# KEYS: two hashes (minute, day) per settlement, then the reserving tenant's two.
# ARGV: now ('': Redis's TIME), tokens to reserve (0: only settle), the two limits (0: no
# limit of that kind), minute window and bucket size, day window and bucket size, the
# allowance, the number of settlements, then (minute bucket, day bucket, delta) each.
# Returns {reserved (1/0), minute wait, day wait, now, minute bucket, day bucket}; a
# wait is 0 (it fits), seconds until it does, or -1 (more than the whole budget).
RESERVE = (
    _COMMON
    + """
local settlements = tonumber(ARGV[10])
for j = 1, settlements do
  local at = 10 + 3 * (j - 1)
  local delta = tonumber(ARGV[at + 3])
  for k = 1, 2 do
    local key, field = KEYS[2 * (j - 1) + k], ARGV[at + k]
    local held = tonumber(redis.call('HGET', key, field))
    if held and held + delta > 0 then
      redis.call('HINCRBY', key, field, delta)
    elseif held then
      redis.call('HDEL', key, field)
    end
  end
end
local tokens = tonumber(ARGV[2])
local fmt = function(x) return string.format('%.17g', x) end
if tokens <= 0 then
  return {1, '0', '0', fmt(now), '', ''}
end
local allowance = tonumber(ARGV[9])
local waits, indices = {}, {}
for k = 1, 2 do
  local key, limit = KEYS[2 * settlements + k], tonumber(ARGV[2 + k])
  local window, size = tonumber(ARGV[3 + 2 * k]), tonumber(ARGV[4 + 2 * k])
  local used, buckets = live(key, window, size, allowance, true)
  local wait = 0
  if limit > 0 and used + tokens > limit then
    wait = -1
    if tokens <= limit then
      table.sort(buckets, function(a, b) return a[1] < b[1] end)
      local excess, freed = used + tokens - limit, 0
      for _, bucket in ipairs(buckets) do
        freed = freed + bucket[2]
        if freed >= excess then
          wait = (bucket[1] + 1) * size + window + allowance - now
          break
        end
      end
    end
  end
  waits[k] = wait
  indices[k] = string.format('%.0f', math.floor(now / size))
end
if waits[1] ~= 0 or waits[2] ~= 0 then
  return {0, fmt(waits[1]), fmt(waits[2]), fmt(now), '', ''}
end
for k = 1, 2 do
  local key = KEYS[2 * settlements + k]
  local window, size = tonumber(ARGV[3 + 2 * k]), tonumber(ARGV[4 + 2 * k])
  redis.call('HINCRBY', key, indices[k], tokens)
  redis.call('PEXPIRE', key, math.ceil((size + window + allowance) * 1000) + 1000)
end
return {1, '0', '0', fmt(now), indices[1], indices[2]}
"""
)

# KEYS: each tenant's two hashes (minute, day). ARGV: now ('': TIME), minute window and
# bucket size, day window and bucket size, the allowance. Returns the tokens each holds.
USAGE = (
    _COMMON
    + """
local used = {}
for i = 1, #KEYS do
  local k = (i - 1) % 2 + 1
  local window, size = tonumber(ARGV[2 * k]), tonumber(ARGV[2 * k + 1])
  used[i] = live(KEYS[i], window, size, tonumber(ARGV[6]), false)
end
return used
"""
)
