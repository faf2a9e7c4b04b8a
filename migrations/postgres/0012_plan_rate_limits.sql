-- Per-customer rate limits at the edge (issue 19, "Fairness"): records per second a customer
-- may send to /api/usage/track and /api/usage/batch, and the burst it may send at once above
-- that rate (a token bucket: the burst refills at the rate). They exist so that one
-- customer's runaway SDK cannot starve the others; a well-behaved SDK must never meet them.
--
-- Why these numbers: the starter plan includes 1,000,000 impressions a month, about 0.4
-- records/s on average; 20,000 records/s is 50,000 times that, and a burst of 200,000 holds
-- twenty batches of the edge's largest size (APEX_BATCH_MAX_RECORDS, default 10,000), so an
-- SDK flushing a backlog after being offline passes at once. One customer at its limit uses
-- a small part of what the edge acknowledges (about 1.48 M records/s in batches, BENCHMARKS.md).
-- Bigger plans get proportionally more. APEX_CUSTOMER_RATE_LIMIT and
-- APEX_CUSTOMER_RATE_BURST override these for every customer.
ALTER TABLE plans
    ADD COLUMN rate_limit_records_per_sec integer NOT NULL DEFAULT 20000
        CHECK (rate_limit_records_per_sec > 0),
    ADD COLUMN rate_limit_burst integer NOT NULL DEFAULT 200000
        CHECK (rate_limit_burst > 0);

UPDATE plans SET rate_limit_records_per_sec = 50000, rate_limit_burst = 500000 WHERE id = 'growth';
UPDATE plans SET rate_limit_records_per_sec = 100000, rate_limit_burst = 1000000 WHERE id = 'scale';
UPDATE plans SET rate_limit_records_per_sec = 200000, rate_limit_burst = 2000000 WHERE id = 'enterprise';
