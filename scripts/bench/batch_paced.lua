-- wrk script: the 1,000-record batches of batch.lua, each connection pausing
-- APEX_BENCH_DELAY_MS between requests, so the connections offer a fixed rate.
dofile("scripts/bench/batch.lua")
local pause = tonumber(os.getenv("APEX_BENCH_DELAY_MS") or "40")
function delay()
  return pause
end
