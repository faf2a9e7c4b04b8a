-- Mediated revenue per customer and month, reported by the admin API or
-- `apexctl revenue set`; the platform fee is charged on it. `month` is the first day of
-- the calendar month (UTC).
CREATE TABLE mediated_revenue (
    customer_id     text NOT NULL REFERENCES customers (id) ON DELETE CASCADE,
    month           date NOT NULL CHECK (extract(day FROM month) = 1),
    revenue_cents   bigint NOT NULL CHECK (revenue_cents >= 0),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, month)
);

-- Monthly add-ons a customer buys (the guide's example: a white-label console).
CREATE TABLE customer_addons (
    customer_id     text NOT NULL REFERENCES customers (id) ON DELETE CASCADE,
    addon           text NOT NULL CHECK (addon ~ '^[a-z0-9_]{1,64}$'),
    description     text NOT NULL CHECK (length(description) BETWEEN 1 AND 200),
    monthly_cents   bigint NOT NULL CHECK (monthly_cents >= 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, addon)
);
