-- wrk script: POST /api/usage/batch with 1,000 records (impressions and api_calls, quantity 1,
-- no event ids, so every record counts); the key comes from APEX_BENCH_KEY.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local records = {}
for i = 1, 1000 do
  local metric = (i % 4 == 0) and "api_calls" or "impressions"
  records[i] = '{"metric_type":"' .. metric .. '","quantity":1,"metadata":{"platform":"iOS"}}'
end
wrk.body = '{"api_key":"' .. os.getenv("APEX_BENCH_KEY") .. '","records":[' .. table.concat(records, ",") .. ']}'
