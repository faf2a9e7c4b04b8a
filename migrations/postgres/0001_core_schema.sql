-- Core schema of the metering and billing system.
-- Names follow the operations guide so its manual SQL runs unchanged:
-- customer ids are text ('cus_...'), quantities are exact bigint,
-- money is bigint cents, times are timestamptz (UTC).

CREATE TABLE plans (
    id                              text PRIMARY KEY,
    name                            text NOT NULL,
    monthly_base_cents              bigint NOT NULL DEFAULT 0 CHECK (monthly_base_cents >= 0),
    -- Platform fee on mediated revenue, in basis points (250 = 2.5 %).
    platform_fee_bps                integer NOT NULL CHECK (platform_fee_bps BETWEEN 0 AND 10000),
    -- Enterprise customers negotiate a rate inside this range.
    platform_fee_bps_min            integer NOT NULL CHECK (platform_fee_bps_min BETWEEN 0 AND 10000),
    platform_fee_bps_max            integer NOT NULL CHECK (platform_fee_bps_max BETWEEN 0 AND 10000),
    -- The monthly mediated-revenue band the plan is meant for, in cents; NULL max = no upper bound.
    revenue_band_min_cents          bigint NOT NULL CHECK (revenue_band_min_cents >= 0),
    revenue_band_max_cents          bigint CHECK (revenue_band_max_cents IS NULL OR revenue_band_max_cents >= revenue_band_min_cents),
    trial_days                      integer NOT NULL DEFAULT 14 CHECK (trial_days >= 0),
    created_at                      timestamptz NOT NULL DEFAULT now(),
    CHECK (platform_fee_bps_min <= platform_fee_bps AND platform_fee_bps <= platform_fee_bps_max)
);

-- Included quantity and overage price of one metric on one plan.
-- Overage is priced per block of `overage_unit_quantity` units (1,000 impressions, 1 GB, ...).
CREATE TABLE plan_limits (
    plan_id                 text NOT NULL REFERENCES plans (id) ON DELETE CASCADE,
    metric_type             text NOT NULL CHECK (metric_type IN ('impressions', 'api_calls', 'data_transfer')),
    included_quantity       bigint CHECK (included_quantity IS NULL OR included_quantity >= 0),
    overage_unit_quantity   bigint NOT NULL CHECK (overage_unit_quantity > 0),
    overage_cents_per_unit  bigint NOT NULL CHECK (overage_cents_per_unit >= 0),
    PRIMARY KEY (plan_id, metric_type)
);

CREATE TABLE customers (
    id                  text PRIMARY KEY CHECK (id ~ '^cus_[A-Za-z0-9_]+$'),
    name                text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    email               text NOT NULL CHECK (position('@' in email) > 1 AND length(email) <= 320),
    -- active: served; suspended: refused at the edge (403 account_suspended); canceled: refused.
    status              text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended', 'canceled')),
    stripe_customer_id  text UNIQUE,
    -- Enterprise rate inside the plan's range, and an optional monthly minimum fee.
    platform_fee_bps_override   integer CHECK (platform_fee_bps_override IS NULL OR platform_fee_bps_override BETWEEN 0 AND 10000),
    platform_fee_minimum_cents  bigint CHECK (platform_fee_minimum_cents IS NULL OR platform_fee_minimum_cents >= 0),
    suspended_at        timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX customers_email_idx ON customers (email);

-- Only the SHA-256 of a key is kept; `prefix` (e.g. 'rsk_AbC12345') lets people tell keys apart.
CREATE TABLE api_keys (
    id              text PRIMARY KEY CHECK (id ~ '^key_[A-Za-z0-9]+$'),
    customer_id     text NOT NULL REFERENCES customers (id) ON DELETE CASCADE,
    key_hash        bytea NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    prefix          text NOT NULL,
    status          text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    revoked_at      timestamptz,
    CHECK ((status = 'revoked') = (revoked_at IS NOT NULL))
);
CREATE INDEX api_keys_customer_idx ON api_keys (customer_id);

CREATE TABLE subscriptions (
    id                      bigserial PRIMARY KEY,
    customer_id             text NOT NULL REFERENCES customers (id) ON DELETE CASCADE,
    plan_id                 text NOT NULL REFERENCES plans (id),
    status                  text NOT NULL CHECK (status IN ('trialing', 'active', 'past_due', 'suspended', 'canceled')),
    stripe_customer_id      text,
    stripe_subscription_id  text UNIQUE,
    trial_end               timestamptz,
    current_period_start    timestamptz,
    current_period_end      timestamptz,
    canceled_at             timestamptz,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    CHECK (current_period_start IS NULL OR current_period_end > current_period_start)
);
CREATE INDEX subscriptions_customer_idx ON subscriptions (customer_id);
-- One live subscription per customer; canceled ones stay as history.
CREATE UNIQUE INDEX subscriptions_one_live_idx ON subscriptions (customer_id) WHERE status <> 'canceled';

-- Hourly rollups written by the pipeline: `recorded_at` is the start of the UTC hour.
-- data_transfer quantities are bytes (1 GB = 1,000,000,000 bytes).
-- No foreign key to customers: usage is a billing fact that outlives key or customer changes.
CREATE TABLE usage_records (
    customer_id     text NOT NULL,
    metric_type     text NOT NULL CHECK (metric_type IN ('impressions', 'api_calls', 'data_transfer')),
    recorded_at     timestamptz NOT NULL CHECK (date_trunc('hour', recorded_at) = recorded_at),
    quantity        bigint NOT NULL CHECK (quantity >= 0),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, metric_type, recorded_at)
);
CREATE INDEX usage_records_recorded_at_idx ON usage_records (recorded_at);

-- Pipeline batches already added to usage_records. A batch is the range
-- [batch_id, end_position) of one write-ahead log (log_id: one per ingest instance); it is
-- recorded in the same transaction as its rollup rows, so a replayed batch is skipped and
-- the largest end_position of a log is where its replay starts.
CREATE TABLE pipeline_batches (
    log_id          text NOT NULL,
    batch_id        bigint NOT NULL CHECK (batch_id >= 0),
    end_position    bigint NOT NULL CHECK (end_position > batch_id),
    record_count    integer NOT NULL CHECK (record_count >= 0),
    applied_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (log_id, batch_id)
);

-- Usage reported to Stripe, one row per customer, metric and UTC day.
CREATE TABLE stripe_usage_sync (
    customer_id         text NOT NULL REFERENCES customers (id) ON DELETE CASCADE,
    usage_date          date NOT NULL,
    metric_type         text NOT NULL CHECK (metric_type IN ('impressions', 'api_calls', 'data_transfer')),
    quantity_reported   bigint NOT NULL DEFAULT 0 CHECK (quantity_reported >= 0),
    status              text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed')),
    stripe_identifier   text,
    attempts            integer NOT NULL DEFAULT 0,
    last_error          text,
    synced_at           timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, usage_date, metric_type)
);

CREATE TABLE dunning_attempts (
    id                  bigserial PRIMARY KEY,
    customer_id         text NOT NULL REFERENCES customers (id) ON DELETE CASCADE,
    subscription_id     bigint REFERENCES subscriptions (id) ON DELETE SET NULL,
    invoice_id          text NOT NULL,
    amount_due_cents    bigint NOT NULL DEFAULT 0 CHECK (amount_due_cents >= 0),
    attempt_number      integer NOT NULL CHECK (attempt_number >= 0),
    status              text NOT NULL CHECK (status IN ('pending', 'retrying', 'succeeded', 'failed', 'suspended', 'canceled')),
    next_retry_at       timestamptz,
    last_error          text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (invoice_id, attempt_number)
);
CREATE INDEX dunning_attempts_customer_idx ON dunning_attempts (customer_id, created_at DESC);
CREATE INDEX dunning_attempts_due_idx ON dunning_attempts (next_retry_at) WHERE status IN ('pending', 'retrying');

-- Outbox of side effects (emails first): written in the transaction that decides them,
-- processed by the every-minute job.
CREATE TABLE events (
    id              bigserial PRIMARY KEY,
    event_type      text NOT NULL,
    data            jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    processed_at    timestamptz,
    error_message   text,
    attempts        integer NOT NULL DEFAULT 0
);
CREATE INDEX events_pending_idx ON events (created_at) WHERE processed_at IS NULL;

-- No foreign key: test sends and emails to people who are not customers are logged too.
CREATE TABLE email_log (
    id                  bigserial PRIMARY KEY,
    customer_id         text,
    email_type          text NOT NULL,
    recipient           text NOT NULL DEFAULT '',
    subject             text NOT NULL DEFAULT '',
    provider            text NOT NULL DEFAULT '',
    provider_message_id text,
    event_id            bigint REFERENCES events (id) ON DELETE SET NULL,
    sent_at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX email_log_customer_type_idx ON email_log (customer_id, email_type, sent_at DESC);
CREATE INDEX email_log_sent_at_idx ON email_log (sent_at DESC);

-- One alert per customer, metric, threshold and billing period.
CREATE TABLE usage_alerts (
    id                  bigserial PRIMARY KEY,
    customer_id         text NOT NULL REFERENCES customers (id) ON DELETE CASCADE,
    metric_type         text NOT NULL CHECK (metric_type IN ('impressions', 'api_calls', 'data_transfer')),
    threshold_percent   integer NOT NULL CHECK (threshold_percent > 0),
    period_start        timestamptz NOT NULL,
    usage_quantity      bigint NOT NULL,
    limit_quantity      bigint NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (customer_id, metric_type, threshold_percent, period_start)
);
CREATE INDEX usage_alerts_created_idx ON usage_alerts (created_at);

-- One row per scheduled run of a job: the unique key makes a second run of the same slot a no-op.
CREATE TABLE cron_runs (
    id              bigserial PRIMARY KEY,
    job_name        text NOT NULL,
    scheduled_for   timestamptz NOT NULL,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    status          text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'succeeded', 'failed')),
    error_message   text,
    details         jsonb NOT NULL DEFAULT '{}'::jsonb,
    UNIQUE (job_name, scheduled_for)
);
