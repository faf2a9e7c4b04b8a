-- The email queue (the `email_queue` job, `apexctl email process`): `events` rows of type
-- `email.<type>` are claimed in bounded batches with FOR UPDATE SKIP LOCKED and a lease, sent
-- through the configured provider and logged in `email_log`.
--
-- The guide's two "failed emails" queries agree with one meaning: `error_message` is set only
-- when an event is given up, together with `processed_at`. A transient failure (a provider
-- 5xx, a timeout, a 429) leaves the event due again at `next_attempt_at`, its error in
-- `last_error`. The guide's "reset to retry" (processed_at and error_message back to NULL)
-- revives an event with a fresh count of attempts (the trigger below).
ALTER TABLE events
    ADD COLUMN last_error text,
    -- Not before this time (a retry's backoff, a cap deferring to the next day); NULL: due.
    ADD COLUMN next_attempt_at timestamptz,
    -- A worker's claim: until `lease_until` no other worker takes the event; a crashed
    -- worker's events come back when it passes.
    ADD COLUMN lease_until timestamptz,
    ADD COLUMN leased_by text,
    -- The same decision enqueued twice is one row (e.g. `payment_retry_2:in_123`).
    ADD COLUMN dedup_key text,
    -- Payment and suspension emails first, then welcome and trial emails, then the rest
    -- (alerts, summaries, SDK notices). Computed, so the guide's plain INSERT gets it too.
    ADD COLUMN priority smallint GENERATED ALWAYS AS (
        CASE
            WHEN event_type IN ('email.payment_failed', 'email.payment_succeeded',
                                'email.subscription_suspended')
                 OR event_type LIKE 'email.payment\_retry%' THEN 0
            WHEN event_type = 'email.welcome' OR event_type LIKE 'email.trial\_ending%' THEN 1
            ELSE 2
        END) STORED;
CREATE UNIQUE INDEX events_dedup_key_idx ON events (dedup_key) WHERE dedup_key IS NOT NULL;
-- What the queue reads: the due emails in priority order.
CREATE INDEX events_email_due_idx ON events (priority, created_at, id)
    WHERE processed_at IS NULL AND event_type LIKE 'email.%';

CREATE FUNCTION apex_event_revived() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.processed_at IS NOT NULL AND NEW.processed_at IS NULL THEN
        NEW.attempts := 0;
        NEW.next_attempt_at := NULL;
        NEW.last_error := NULL;
        NEW.lease_until := NULL;
        NEW.leased_by := NULL;
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER events_revived BEFORE UPDATE OF processed_at ON events
    FOR EACH ROW EXECUTE FUNCTION apex_event_revived();

-- What happened to each email: `sent` (the provider accepted it; `provider_message_id` is
-- its id), `suppressed` (not sent: the address hard-bounced or complained; logged so an
-- operator sees that a transactional email did not go). `idempotency_key` is what the
-- provider was given (`apex-email-<event id>`). Resend's webhooks fill `delivery_status`
-- (`delivered`, `bounced`, `complained`) and `delivery_at`.
ALTER TABLE email_log
    ADD COLUMN status text NOT NULL DEFAULT 'sent' CHECK (status IN ('sent', 'suppressed')),
    ADD COLUMN idempotency_key text,
    ADD COLUMN delivery_status text CHECK (delivery_status IN ('delivered', 'bounced', 'complained')),
    ADD COLUMN delivery_at timestamptz;
CREATE UNIQUE INDEX email_log_event_idx ON email_log (event_id) WHERE event_id IS NOT NULL;
CREATE INDEX email_log_provider_message_idx ON email_log (provider_message_id)
    WHERE provider_message_id IS NOT NULL;

-- Customers who opted out of a non-transactional category (`monthly_summary`, `sdk_update`,
-- `usage_alert`). Payment, suspension, welcome and trial emails always go.
CREATE TABLE email_opt_outs (
    customer_id     text NOT NULL REFERENCES customers (id) ON DELETE CASCADE,
    category        text NOT NULL CHECK (category IN ('monthly_summary', 'sdk_update', 'usage_alert')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, category)
);

-- Addresses that hard-bounced or complained (from Resend's webhooks): no non-transactional
-- email goes to them again; a transactional one is logged `suppressed` for an operator.
CREATE TABLE email_suppressions (
    address         text PRIMARY KEY CHECK (address = lower(address)),
    reason          text NOT NULL CHECK (reason IN ('bounced', 'complained')),
    provider_message_id text,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- Resend's delivery webhooks (`POST /webhooks/resend`, Svix-signed), each stored once by its
-- `svix-id`: a redelivery changes nothing.
CREATE TABLE resend_events (
    id              text PRIMARY KEY,
    event_type      text NOT NULL,
    payload         jsonb NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    processed_at    timestamptz
);

-- Email events enqueued before the sender existed (sign-ups have written `email.welcome`
-- since 0001): sending them now would greet every customer ever created, trial dates long
-- past. They are closed with a note, never sent; the guide's "reset to retry" revives one.
UPDATE events SET processed_at = now(),
    last_error = 'not sent: enqueued before the email sender existed (migration 0009)'
WHERE event_type LIKE 'email.%' AND processed_at IS NULL;
