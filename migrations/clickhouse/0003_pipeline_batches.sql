-- Progress of each write-ahead log's ClickHouse applier: a 'started' row before a batch's
-- rows are inserted, a 'done' row after. The newest row of a log says where replay resumes
-- and whether a batch may be half written (see pipeline/src/clickhouse_sink.rs).
-- Runs on ClickHouse 18.16 and current releases (no TTL: 18.16 lacks it; two small rows a
-- batch, about 170,000 a day at one batch a second).
CREATE TABLE IF NOT EXISTS pipeline_batches
(
    log_id String,
    batch_id UInt64,
    end_position UInt64,
    rows UInt64,
    state Enum8('started' = 1, 'done' = 2),
    min_ts DateTime,
    max_ts DateTime,
    written_at DateTime DEFAULT now()
)
ENGINE = MergeTree()
ORDER BY (log_id, batch_id);
