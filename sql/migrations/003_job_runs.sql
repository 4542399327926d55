-- When each fleet-wide job last ran, so that several Edge processes sharing this database run
-- it once per interval between them (the runner holds an advisory lock while it checks and runs).
CREATE TABLE job_runs (
    name          text PRIMARY KEY,
    started_at    timestamptz NOT NULL,
    finished_at   timestamptz,
    status        text NOT NULL DEFAULT 'running',
    runs          bigint NOT NULL DEFAULT 1
);
