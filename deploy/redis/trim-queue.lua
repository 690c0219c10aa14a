-- Remove the queue entries every worker is done with. A job's entry (its whole request, base64
-- inputs included) stays in jobs:<priority> after its worker acknowledged it: nothing else trims
-- the streams. Kept: entries not yet given to a worker, those a worker holds (pending: it may die
-- and another worker reclaims them), and the last one handed out. The group's lag stays exact
-- (KEDA and MAX_QUEUED_JOBS read it). Atomic, so it races with nothing.
--   redis-cli --eval trim-queue.lua jobs:high jobs:normal jobs:low , workers
local removed = 0
for _, stream in ipairs(KEYS) do
  if redis.call('EXISTS', stream) == 1 then
    for _, fields in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
      local group = {}
      for i = 1, #fields, 2 do group[fields[i]] = fields[i + 1] end
      if group['name'] == ARGV[1] then
        local keep = group['last-delivered-id']
        local pending = redis.call('XPENDING', stream, ARGV[1])
        if pending[1] > 0 then keep = pending[2] end
        removed = removed + redis.call('XTRIM', stream, 'MINID', keep)
      end
    end
  end
end
return removed
