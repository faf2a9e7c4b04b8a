-- Stripe webhook events, each stored once by its id: a second delivery of the same event
-- is a no-op. `processed_at` is set when billing has applied it (the subscription status
-- today; the dunning work adds more).
CREATE TABLE stripe_events (
    id              text PRIMARY KEY CHECK (id ~ '^evt_[A-Za-z0-9_]+$'),
    event_type      text NOT NULL,
    stripe_created  timestamptz,
    payload         jsonb NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    processed_at    timestamptz
);
CREATE INDEX stripe_events_type_idx ON stripe_events (event_type, received_at);
