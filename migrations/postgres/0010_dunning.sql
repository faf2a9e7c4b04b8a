-- Dunning (apex_billing::dunning): a failed invoice payment opens a case, our retries run on
-- the guide's timeline (Days 3, 4 and 7 after the failure by default), the last failure
-- suspends the customer, and a payment at any time reactivates it.
--
-- The guide's `dunning_attempts` keeps one row per attempt, so its SQL ("check dunning
-- status", "pending retries", "dunning history", "Dunning Effectiveness") reads it as it is:
-- - `attempt_number` 0 is the case itself: the payment that failed on Day 0. One case per
--   invoice (the table's unique (invoice_id, attempt_number)). Its `status` is the case's:
--   `failed` while retries run, `suspended` once the last retry failed and the customer was
--   suspended, `succeeded` once the invoice was paid (by our retry or otherwise), `canceled`
--   when closed without a payment (voided, closed by an operator, the customer exempt).
-- - `attempt_number` 1..N are our retries: `pending` (due at `next_retry_at`), `retrying`
--   (sent to Stripe, the answer not yet recorded), `succeeded`, `failed`, or `canceled`
--   (never made: the case closed first). At most one is pending or retrying at a time.
ALTER TABLE dunning_attempts
    -- Case row: when the payment failed as Stripe reports it (Day 0). Attempt rows: when
    -- that attempt failed.
    ADD COLUMN failed_at timestamptz,
    -- Stripe's decline code (`insufficient_funds`) or error code of the failure.
    ADD COLUMN failure_code text,
    -- When the attempt was last sent to Stripe; a `retrying` row older than the lease (the
    -- process making it died) is taken up again, with the same idempotency key.
    ADD COLUMN attempted_at timestamptz,
    -- Times Stripe could not be reached (5xx, timeout, 429) and the attempt was put off.
    ADD COLUMN postponements integer NOT NULL DEFAULT 0 CHECK (postponements >= 0),
    -- Case row: when the customer was suspended by this case.
    ADD COLUMN suspended_at timestamptz,
    -- Case row: how the case closed (NULL while open): `retry_succeeded`, `paid` (paid
    -- otherwise: by hand, by Stripe), `voided`, `closed` (by an operator), `exempt`
    -- (the customer is exempt from dunning), `reactivated` (an operator restored service).
    ADD COLUMN resolution text CHECK (resolution IN
        ('retry_succeeded', 'paid', 'voided', 'closed', 'exempt', 'reactivated')),
    ADD COLUMN resolved_at timestamptz,
    -- Who closed it by hand, and why (operators' commands only).
    ADD COLUMN resolved_by text,
    ADD COLUMN resolution_note text,
    -- Case row: the invoice's currency and its hosted page (where the customer pays or
    -- updates the card), as the failed-payment event gave them, for the case's emails.
    ADD COLUMN currency text NOT NULL DEFAULT 'usd',
    ADD COLUMN update_payment_url text,
    ADD CONSTRAINT dunning_attempts_resolution_on_case
        CHECK (resolution IS NULL OR attempt_number = 0),
    ADD CONSTRAINT dunning_attempts_resolved_together
        CHECK ((resolution IS NULL) = (resolved_at IS NULL));

-- Open cases of a customer (what reactivation and the dashboards read).
CREATE INDEX dunning_attempts_open_cases_idx ON dunning_attempts (customer_id)
    WHERE attempt_number = 0 AND resolved_at IS NULL;

-- An operator can exempt a customer from dunning (no retries, no dunning email, never
-- suspended by it); who and why are kept.
ALTER TABLE customers
    ADD COLUMN dunning_exempt boolean NOT NULL DEFAULT false,
    ADD COLUMN dunning_exempt_note text;

-- Stripe does not deliver events in order: whether an invoice was already paid or voided when
-- its `invoice.payment_failed` arrives late is read from the stored events by invoice id.
CREATE INDEX stripe_events_invoice_idx ON stripe_events ((payload -> 'data' -> 'object' ->> 'id'))
    WHERE event_type LIKE 'invoice.%';
