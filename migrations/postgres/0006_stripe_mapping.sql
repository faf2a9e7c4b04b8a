-- The Stripe side of our catalogue (apexctl stripe catalog): one billing meter per metric and,
-- per plan, a product and the monthly base fee (a Stripe plan, usable wherever a price id is).
CREATE TABLE stripe_meters (
    metric_type         text PRIMARY KEY CHECK (metric_type IN ('impressions', 'api_calls', 'data_transfer')),
    event_name          text NOT NULL UNIQUE,
    stripe_meter_id     text NOT NULL UNIQUE,
    created_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE stripe_plans (
    plan_id             text PRIMARY KEY REFERENCES plans (id),
    stripe_product_id   text NOT NULL,
    -- Stripe prices are immutable: a changed base fee gets a new Stripe plan id here.
    stripe_plan_id      text NOT NULL,
    monthly_base_cents  bigint NOT NULL CHECK (monthly_base_cents >= 0),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- The usage sync sends a day as meter events: revision 0 carries the whole day, later
-- revisions the difference a late record made. `revisions` counts the events Stripe has
-- accepted; `pending_quantity` (with `stripe_identifier`) is an event about to be sent, kept
-- so that a run interrupted after Stripe accepted it resends exactly the same event (same
-- identifier and idempotency key) instead of a recomputed one.
-- `pending_since` dates it: Stripe keeps idempotency keys (and promises unique identifiers)
-- for 24 hours only, so an older pending event is checked against Stripe's own total for the
-- day before anything is sent again. `attempts` numbers the idempotency key: it moves on only
-- when Stripe refused an event outright, so an event whose fate is unknown keeps its key.
ALTER TABLE stripe_usage_sync
    ADD COLUMN revisions integer NOT NULL DEFAULT 0 CHECK (revisions >= 0),
    ADD COLUMN pending_quantity bigint CHECK (pending_quantity IS NULL OR pending_quantity > 0),
    ADD COLUMN pending_since timestamptz;
