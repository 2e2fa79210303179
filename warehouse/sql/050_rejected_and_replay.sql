-- Poison segments and quarantine replay (issue 11, items 4 and 5). Additive: safe on every connect.
-- Numbered after 020 because it extends pipeline_runs, which 020 creates.

-- Landing segments set aside in landing/rejected/ because they cannot be read as a whole (bad header, a
-- record that is not JSON/base64, a key the keyring lacks, failed authentication). Their messages are
-- unknown until the cause is fixed, so they count here, not in `segments`: every sealed segment is
-- absorbed (segments), rejected (here, replayed_at NULL) or pending (still in sealed/).
CREATE TABLE IF NOT EXISTS rejected_segments (
    segment         VARCHAR PRIMARY KEY,
    reason          VARCHAR NOT NULL,      -- bad_header | unknown_key | decrypt_failed | truncated | bad_record | unknown
    detail          VARCHAR,               -- parser/decrypt message: positions and field names, no values
    records         INTEGER NOT NULL,      -- newline-terminated lines after the header: its messages, as known
    bytes           BIGINT NOT NULL,
    rejected_at     TIMESTAMPTZ NOT NULL,
    origin          VARCHAR,               -- what set it aside: "batch <id>", "keys rotate", ...
    batch_id        VARCHAR,               -- the pipeline batch that met it (links it to its run record)
    run_id          VARCHAR,
    replayed_at     TIMESTAMPTZ,           -- moved back to sealed/ by an operator: no longer waiting
    times_rejected  INTEGER NOT NULL DEFAULT 1
);

ALTER TABLE pipeline_runs ADD COLUMN IF NOT EXISTS rejected_segments INTEGER;

-- One row per `rpm quarantine replay`: what was re-judged and where it went (counts only, no PHI).
CREATE TABLE IF NOT EXISTS quarantine_replays (
    replay_id          VARCHAR PRIMARY KEY,
    reason             VARCHAR NOT NULL,
    replayed_at        TIMESTAMPTZ NOT NULL,
    examined           INTEGER NOT NULL,
    loaded             INTEGER NOT NULL,
    duplicates         INTEGER NOT NULL,
    still_quarantined  INTEGER NOT NULL,
    reasons_changed    INTEGER NOT NULL,
    not_rebuilt        INTEGER NOT NULL   -- items whose stored form could not be re-read (left as they were)
);
