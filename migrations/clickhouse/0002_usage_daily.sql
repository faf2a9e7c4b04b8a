-- Daily totals per customer and metric for the analytics API. SummingMergeTree merges rows
-- of the same key in the background, so readers must still sum(quantity) with GROUP BY.
CREATE TABLE IF NOT EXISTS usage_daily
(
    day Date,
    customer_id String,
    metric_type Enum8('impressions' = 1, 'api_calls' = 2, 'data_transfer' = 3),
    quantity UInt64
)
ENGINE = SummingMergeTree(quantity)
PARTITION BY toYYYYMM(day)
ORDER BY (customer_id, metric_type, day);

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_daily_mv TO usage_daily AS
SELECT
    toDate(ts) AS day,
    customer_id,
    metric_type,
    sum(quantity) AS quantity
FROM usage_events
GROUP BY day, customer_id, metric_type;
