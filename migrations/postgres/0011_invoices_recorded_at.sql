-- When an invoice row was written, on the database's clock (`invoices.created_at` is the
-- close's time, which a simulated clock may set far from the database's). Reconciliation
-- (`apexctl reconcile`) compares it with `usage_records.updated_at` and
-- `mediated_revenue.updated_at`, both the database's: usage or revenue changed after the
-- newest invoice was written is adjusted by the next close. Rows written before this
-- migration get the migration's time: later than their writing, which can only call a change
-- made in between already invoiced (the conservative side: drift, never a hidden one).
ALTER TABLE invoices ADD COLUMN recorded_at timestamptz NOT NULL DEFAULT now();
