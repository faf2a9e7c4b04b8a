-- Raw usage records, one row per accepted record, with the client's event id, the
-- write-ahead log it came from, the pipeline batch that wrote it and the row's index in that
-- batch (replay looks the rows of a batch up before inserting again: see
-- pipeline/src/clickhouse_sink.rs).
-- Runs on ClickHouse 18.16 and current releases: Enum8 instead of LowCardinality,
-- DateTime (seconds) instead of DateTime64, which 18.16 lacks.
-- data_transfer quantities are bytes (1 GB = 1,000,000,000 bytes).
CREATE TABLE IF NOT EXISTS usage_events
(
    customer_id String,
    metric_type Enum8('impressions' = 1, 'api_calls' = 2, 'data_transfer' = 3),
    quantity UInt64,
    event_id String,
    batch_id UInt64,
    ts DateTime,
    received_at DateTime,
    metadata String,
    log_id String,
    batch_seq UInt32
)
ENGINE = MergeTree()
PARTITION BY toYYYYMM(ts)
ORDER BY (customer_id, metric_type, ts);
