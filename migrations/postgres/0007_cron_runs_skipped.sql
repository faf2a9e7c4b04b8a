-- The cron process (apex-cron). A slot can now be `skipped`: the job's previous run still
-- held the job's lock when the slot came. A slot whose runner died mid-run is run once more
-- in its own row (the row is the slot: UNIQUE (job_name, scheduled_for) stays): `attempts`
-- counts its runs, `runner` names the process that made the latest (host:pid), `lock_pid`
-- is the database session holding the job's lock for it (so a replica that finds the lock
-- held can tell which slot its holder runs), and what happened to an earlier attempt stays
-- in `details.previous_attempts`.
ALTER TABLE cron_runs DROP CONSTRAINT cron_runs_status_check;
ALTER TABLE cron_runs ADD CONSTRAINT cron_runs_status_check
    CHECK (status IN ('running', 'succeeded', 'failed', 'skipped'));
ALTER TABLE cron_runs ADD COLUMN attempts integer NOT NULL DEFAULT 1 CHECK (attempts >= 1);
ALTER TABLE cron_runs ADD COLUMN runner text;
ALTER TABLE cron_runs ADD COLUMN lock_pid integer;
-- The sweep for dead runners reads the running rows; history and retention read by time.
CREATE INDEX cron_runs_running_idx ON cron_runs (job_name) WHERE status = 'running';
CREATE INDEX cron_runs_scheduled_for_idx ON cron_runs (scheduled_for);
