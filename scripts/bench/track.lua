-- wrk script: POST the operations guide's track body; the key comes from APEX_BENCH_KEY.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"api_key":"' .. os.getenv("APEX_BENCH_KEY") ..
  '","metric_type":"impressions","quantity":1000,"metadata":{"platform":"iOS","sdk_version":"1.0.0"}}'
