-- Monthly invoices (the invoice_close job) and the local mirror of their Stripe invoices.
--
-- One row per customer and billing period (the calendar month in UTC): the lines are written
-- here, in one transaction, before anything is sent to Stripe, and never change afterwards, so
-- a run that dies at any point resumes with exactly the same lines and idempotency keys.
-- `status` is Stripe's invoice status (`draft`, `open`, `paid`, `void`, `uncollectible`), or
-- ours before Stripe has the invoice: `pending` (written, not yet created in Stripe) and
-- `nothing_due` (a month with no line: no Stripe invoice is created).
CREATE TABLE invoices (
    id                      bigserial PRIMARY KEY,
    customer_id             text NOT NULL REFERENCES customers (id) ON DELETE CASCADE,
    period_start            timestamptz NOT NULL,
    period_end              timestamptz NOT NULL CHECK (period_end > period_start),
    plan_id                 text NOT NULL,
    status                  text NOT NULL CHECK (status IN
                                ('pending', 'nothing_due', 'draft', 'open', 'paid', 'void', 'uncollectible')),
    currency                text NOT NULL DEFAULT 'usd',
    -- Sum of our lines, cents: what Stripe's invoice total must equal.
    total_cents             bigint NOT NULL,
    -- The mediated revenue the platform-fee line was computed on; NULL when none was
    -- reported by the time the invoice was issued (then there is no fee line).
    revenue_cents           bigint,
    -- The prices and terms the month was invoiced on (plan, fee bands, negotiated terms,
    -- add-ons): pricing the month again for an adjustment uses them, so only a change of its
    -- revenue or usage is ever adjusted, never a later price or contract change.
    pricing                 jsonb NOT NULL,
    stripe_invoice_id       text UNIQUE,
    amount_due_cents        bigint,
    amount_paid_cents       bigint,
    hosted_invoice_url      text,
    attempt_count           integer NOT NULL DEFAULT 0,
    finalized_at            timestamptz,
    paid_at                 timestamptz,
    voided_at               timestamptz,
    -- The latest failed payment (invoice.payment_failed) and Stripe's next attempt.
    payment_failed_at       timestamptz,
    next_payment_attempt    timestamptz,
    -- `created` of the latest Stripe event applied to this row: an older event never undoes
    -- a newer one (Stripe does not promise delivery order).
    stripe_event_at         timestamptz,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    UNIQUE (customer_id, period_start)
);
CREATE INDEX invoices_status_idx ON invoices (status);

-- The lines of an invoice, in invoice order. `line_key` names the line within the invoice
-- (`plan`, `platform_fee`, `overage:impressions`, `addon:<addon>`,
-- `adjustment:<YYYY-MM>`); Stripe's invoice item carries it as metadata `apex_line`, and it is
-- part of the item's idempotency key. An adjustment corrects `corrects_period_start`, an
-- earlier period whose revenue or usage changed after it was invoiced.
CREATE TABLE invoice_lines (
    invoice_id              bigint NOT NULL REFERENCES invoices (id) ON DELETE CASCADE,
    line_key                text NOT NULL,
    position                integer NOT NULL,
    kind                    text NOT NULL CHECK (kind IN ('plan', 'platform_fee', 'overage', 'addon', 'adjustment')),
    description             text NOT NULL,
    metric_type             text,
    -- The billed quantity as the preview shows it (a JSON number).
    quantity                jsonb,
    amount_cents            bigint NOT NULL,
    corrects_period_start   timestamptz,
    stripe_invoice_item_id  text UNIQUE,
    PRIMARY KEY (invoice_id, line_key),
    -- Only an adjustment a person approved may be negative (a credit).
    CHECK (amount_cents > 0 OR kind = 'adjustment'),
    CHECK ((kind = 'adjustment') = (corrects_period_start IS NOT NULL))
);

-- What the invoicing left for a person: `revenue_missing` (issued without a platform-fee
-- line after waiting for revenue), `negative_adjustment` (a period invoiced too much: a
-- credit is never sent without a person's say), `total_mismatch` (Stripe's draft total is not
-- ours: not finalized). Open while `resolved_at` is NULL; at most one open review per
-- customer, period and kind. A person approves a credit of exactly `amount_cents`; the
-- invoice that carries it is `applied_invoice_id`, so an approval is used once. An open credit
-- the month no longer needs (its difference went back to zero or above) is `superseded`.
CREATE TABLE invoice_reviews (
    id                      bigserial PRIMARY KEY,
    customer_id             text NOT NULL REFERENCES customers (id) ON DELETE CASCADE,
    period_start            timestamptz NOT NULL,
    kind                    text NOT NULL CHECK (kind IN ('revenue_missing', 'negative_adjustment', 'total_mismatch')),
    amount_cents            bigint NOT NULL DEFAULT 0,
    details                 text NOT NULL DEFAULT '',
    created_at              timestamptz NOT NULL DEFAULT now(),
    resolved_at             timestamptz,
    -- approved: the credit goes on the next invoice; dismissed: nothing is sent;
    -- superseded: no longer needed.
    resolution              text CHECK (resolution IN ('approved', 'dismissed', 'superseded')),
    applied_invoice_id      bigint REFERENCES invoices (id) ON DELETE SET NULL,
    CHECK ((resolved_at IS NULL) = (resolution IS NULL))
);
CREATE UNIQUE INDEX invoice_reviews_open_idx ON invoice_reviews (customer_id, period_start, kind)
    WHERE resolved_at IS NULL;

-- A subscription's status follows Stripe's events; `stripe_event_at` is the `created` time of
-- the latest one applied, so an older event delivered late never undoes a newer one.
ALTER TABLE subscriptions ADD COLUMN stripe_event_at timestamptz;
