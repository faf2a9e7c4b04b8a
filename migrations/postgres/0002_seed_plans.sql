-- Plans of the operations guide's platform-fee bands.
-- Starter includes 1,000,000 impressions a month (the guide's example); overage prices are
-- per block: 1,000 impressions, 1,000 API calls, 1 GB (1,000,000,000 bytes) of data transfer.
INSERT INTO plans (id, name, platform_fee_bps, platform_fee_bps_min, platform_fee_bps_max,
                   revenue_band_min_cents, revenue_band_max_cents)
VALUES
    ('starter',    'Starter',       0,   0,   0,        0,   1000000),
    ('growth',     'Growth',      250, 250, 250,  1000001,  10000000),
    ('scale',      'Scale',       200, 200, 200, 10000001,  50000000),
    ('enterprise', 'Enterprise',  150, 100, 150, 50000001,      NULL);

INSERT INTO plan_limits (plan_id, metric_type, included_quantity, overage_unit_quantity, overage_cents_per_unit)
VALUES
    ('starter',    'impressions',        1000000,        1000, 10),
    ('starter',    'api_calls',           100000,        1000,  5),
    ('starter',    'data_transfer',    50000000000, 1000000000, 10),
    ('growth',     'impressions',       10000000,        1000,  8),
    ('growth',     'api_calls',          1000000,        1000,  4),
    ('growth',     'data_transfer',   500000000000, 1000000000,  8),
    ('scale',      'impressions',      100000000,        1000,  5),
    ('scale',      'api_calls',         10000000,        1000,  3),
    ('scale',      'data_transfer',  5000000000000, 1000000000,  5),
    ('enterprise', 'impressions',           NULL,        1000,  0),
    ('enterprise', 'api_calls',             NULL,        1000,  0),
    ('enterprise', 'data_transfer',         NULL, 1000000000,  0);
