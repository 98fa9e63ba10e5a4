-- The study database: one SQLite file per study root (runs/<study>/study.db).
-- The driver process is the only writer; workers report their results to it.
-- A report can always be rebuilt from this file (and the run directories it indexes).

PRAGMA foreign_keys = ON;

CREATE TABLE IF NOT EXISTS studies (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    spec_json   TEXT NOT NULL,          -- the study file as resolved (base config, axes, metric, findings)
    root        TEXT NOT NULL,          -- directory that holds the run directories
    created_at  REAL NOT NULL
);

CREATE TABLE IF NOT EXISTS runs (
    id                      INTEGER PRIMARY KEY,
    study_id                INTEGER NOT NULL REFERENCES studies(id),
    name                    TEXT NOT NULL,  -- unique inside the study; also the run directory's name
    axes_json               TEXT NOT NULL,  -- {"lora.r": 8, "lora.alpha": 16, "train.seed": 1}: the values this run varies
    config_json             TEXT NOT NULL,  -- the full resolved training config
    status                  TEXT NOT NULL,  -- pending | running | completed | failed | diverged | out_of_memory
                                            -- | interrupted | skipped | stopped_early
                                            -- | invalid (bad input found before step 1) | paused (train.stop_at_step)
    run_dir                 TEXT,
    attempts                INTEGER NOT NULL DEFAULT 0,
    started_at              REAL,
    finished_at             REAL,
    wall_time_s             REAL,
    train_time_s            REAL,
    tokens_per_s            REAL,
    peak_memory_bytes       INTEGER,
    estimated_memory_bytes  INTEGER,
    trainable_params        INTEGER,
    total_params            INTEGER,
    final_eval_loss         REAL,
    best_eval_loss          REAL,
    stopped_at_step         INTEGER,        -- successive halving: the step a run was stopped at
    error                   TEXT,
    UNIQUE (study_id, name)
);

CREATE TABLE IF NOT EXISTS metrics (
    run_id  INTEGER NOT NULL REFERENCES runs(id),
    step    INTEGER NOT NULL,
    name    TEXT NOT NULL,                  -- train_loss, eval_loss, lr, "arithmetic_2ds/exact_match", ...
    value   REAL,
    PRIMARY KEY (run_id, step, name)
);
