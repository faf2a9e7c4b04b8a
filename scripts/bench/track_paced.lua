-- wrk script: the track body of track.lua, each connection pausing APEX_BENCH_DELAY_MS
-- between requests, so 64 connections offer a fixed rate (latency at a known load).
dofile("scripts/bench/track.lua")
local pause = tonumber(os.getenv("APEX_BENCH_DELAY_MS") or "10")
function delay()
  return pause
end
