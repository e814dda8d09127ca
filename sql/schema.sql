-- fraiseql_obs: tables. Runs first (bootstrap), before any function exists.
--
-- Everything lives in the extension's schema (@extschema@, `public` unless
-- CREATE EXTENSION ... SCHEMA says otherwise), except the seed's `monitoring.*`
-- names, which are views or tables in the `monitoring` schema.

CREATE SCHEMA IF NOT EXISTS monitoring;

-- ---------------------------------------------------------------------------
-- Restoring a dump. pg_dump's output (restored by pg_restore, or by psql in
-- plain format) runs with row_security = off, which CREATE EXTENSION leaves
-- as it is; an ordinary CREATE EXTENSION runs with the default, on. When
-- restoring, the script creates no partition (the dump brings them: creating
-- them here would collide) and none of the rows the dump carries (state,
-- partition configuration, channels: they would be duplicates), and the
-- worker makes no partition while the restoring session is connected. When
-- that session has gone, _fraiseql_complete_install() adds whatever the dump
-- did not bring (a schema-only restore; or a CREATE EXTENSION that merely
-- ran with row_security off), so an install is never left incomplete.
-- ---------------------------------------------------------------------------
CREATE TABLE tb_restore_session (
    pid           integer NOT NULL,
    backend_start timestamptz NOT NULL,
    -- the restoring transaction: rows of later transactions are this
    -- database's own
    xid           xid8 NOT NULL
);
INSERT INTO tb_restore_session
SELECT a.pid, a.backend_start, pg_current_xact_id()
  FROM pg_stat_activity a
 WHERE a.pid = pg_backend_pid() AND current_setting('row_security') = 'off';

-- A group's id, derived from its fingerprint (UUIDv5; src/fingerprint.rs).
CREATE FUNCTION fraiseql_error_id(fingerprint text) RETURNS uuid
LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE
AS 'MODULE_PATHNAME', 'fraiseql_error_id_wrapper';

-- ---------------------------------------------------------------------------
-- Error groups: one row per fingerprint.
-- occurrence_count / first_seen / last_seen are folded in from the occurrences
-- (see "Counting" below).
-- ---------------------------------------------------------------------------
CREATE TABLE tb_error_log (
    -- derived from the fingerprint (UUIDv5): a capture knows its group's id
    -- without reading or writing the group row, so it never waits for a
    -- session that is creating the same group (the fold creates groups)
    error_id            uuid PRIMARY KEY GENERATED ALWAYS AS (fraiseql_error_id(error_fingerprint)) STORED,
    error_fingerprint   text NOT NULL UNIQUE,
    fingerprint_version integer NOT NULL DEFAULT 1,
    error_type          text NOT NULL,
    error_message       text NOT NULL,
    stack_trace         text,
    title               text,
    culprit             text,
    severity            text NOT NULL DEFAULT 'error'
        CHECK (severity IN ('debug', 'info', 'warning', 'error', 'critical')),
    environment         text NOT NULL,
    release_version     text,
    occurrence_count    bigint NOT NULL DEFAULT 0,
    -- of them, stored without stack trace and context (spike protection)
    occurrences_not_stored bigint NOT NULL DEFAULT 0,
    first_seen          timestamptz NOT NULL DEFAULT now(),
    last_seen           timestamptz NOT NULL DEFAULT now(),
    status              text NOT NULL DEFAULT 'unresolved'
        CHECK (status IN ('unresolved', 'resolved', 'ignored')),
    assigned_to         text,
    resolved_at         timestamptz,
    resolved_by         text,
    resolution_notes    text,
    -- regression: a resolved group that recurred
    is_regression       boolean NOT NULL DEFAULT false,
    regressed_at        timestamptz,
    regression_count    integer NOT NULL DEFAULT 0,
    -- release-aware resolution (fraiseql_resolve_error's in_release and
    -- in_next_release): only an occurrence of this release or a later one
    -- reopens the group...
    resolved_in_release text,
    -- ...or only one of a release first seen after resolved_at
    resolved_in_next_release boolean NOT NULL DEFAULT false,
    -- the release of the occurrence that last reopened it
    regressed_in_release text,
    -- archived until a condition (fraiseql_archive_error, Sentry's "ignore
    -- until"): status 'ignored' with any of these set. The fold checks them
    -- when the group's occurrences are counted; the first met reopens the
    -- group as escalating. archive_until (for an interval) only ends the
    -- archive: the group is unresolved again, as in Sentry.
    archived_at               timestamptz,
    archived_by               text,
    archive_until             timestamptz,
    -- occurrences counted since archived (new ones only: deletes, merges
    -- and unmerges move the count, not this)
    archive_added             bigint,
    archive_until_occurrences bigint CHECK (archive_until_occurrences > 0),      -- this many more
    archive_until_rate        integer CHECK (archive_until_rate BETWEEN 1 AND 100000),  -- this many within the window
    archive_rate_window       interval CHECK (archive_rate_window > interval '0' AND archive_rate_window <= interval '30 days'),
    archive_until_users       integer CHECK (archive_until_users BETWEEN 1 AND 100000),  -- this many distinct users since archived
    archive_users_window      interval CHECK (archive_users_window > interval '0' AND archive_users_window <= interval '30 days'),
    -- reopened by an archive condition (cleared by any triage action)
    is_escalating             boolean NOT NULL DEFAULT false,
    escalated_at              timestamptz
) WITH (fillfactor = 70);
-- No index on occurrence_count, first_seen or last_seen: folding the counters
-- (every second) then stays a HOT update that touches no index.
CREATE INDEX idx_error_log_status ON tb_error_log (status);
-- archives that end at a time: found by the fold without a scan
CREATE INDEX idx_error_log_archive_until ON tb_error_log (archive_until) WHERE archive_until IS NOT NULL;

COMMENT ON TABLE tb_error_log IS
  'One row per error group (fingerprint). occurrence_count and last_seen are '
  'folded in from tb_error_occurrence by fraiseql_flush_counts() (the worker runs '
  'it every second); v_error_groups shows live values.';

-- Ownership rules (Sentry's "issue owners"): a new group whose error
-- matches a rule is assigned to its owner; of several matching, the last
-- (highest position) wins, as in Sentry and CODEOWNERS. Patterns are globs
-- (* any characters, ? one); a path matches a stack frame's file, whole or
-- from a '/' on (src/payments/* matches /app/src/payments/charge.py).
CREATE FUNCTION _fraiseql_glob_regex(p_glob text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT '^' OPERATOR(pg_catalog.||)
           pg_catalog.replace(pg_catalog.replace(
               pg_catalog.regexp_replace(p_glob, '([.+^$(){}\[\]|\\])', '\\\1', 'g'),
               '*', '.*'), '?', '.') OPERATOR(pg_catalog.||) '$'
$$;

CREATE TABLE tb_ownership_rule (
    rule_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- the order (NULL: rule_id's, the order they were added in)
    position   bigint,
    match_kind text NOT NULL CHECK (match_kind IN ('path', 'module', 'type', 'tag', 'url')),
    tag_key    text CHECK ((match_kind = 'tag') = (tag_key IS NOT NULL)),
    pattern    text NOT NULL CHECK (pattern <> '' AND length(pattern) <= 1000),
    assignee   text NOT NULL CHECK (assignee <> ''),
    enabled    boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- (derived, never written: no rule can carry a regular expression of its own)
    regex      text GENERATED ALWAYS AS (_fraiseql_glob_regex(pattern)) STORED
);

-- Merged groups (fraiseql_merge_errors): the occurrences of a fingerprint
-- whose group was merged keep their own error_id (derived from the
-- fingerprint, so capture still reads nothing); the fold counts them into
-- the target, and every read of a group's occurrences takes its sources
-- with it. Unmerging is deleting the row: the fingerprint's occurrences are
-- its own again, and they stay so.
CREATE TABLE tb_error_merge (
    source_id   uuid PRIMARY KEY,      -- fraiseql_error_id(fingerprint)
    fingerprint text NOT NULL,
    target_id   uuid NOT NULL,
    merged_at   timestamptz NOT NULL DEFAULT now(),
    merged_by   text,
    CHECK (source_id <> target_id)
);
CREATE INDEX idx_error_merge_target ON tb_error_merge (target_id);

-- The users each fingerprint's occurrences affected (context.user_id, or
-- user.id of a Sentry event), with when each was first and last seen,
-- kept by the fold: distinct users within a window (rules' users_threshold,
-- archives' until_users) are read here, one row per user, never from the
-- occurrences. By the occurrence's own error_id, so merges change nothing.
-- Times are to the minute (a busy user does not rewrite the row each fold)
-- and never ahead of the server's clock.
CREATE TABLE tb_error_user (
    error_id   uuid NOT NULL,
    user_key   uuid NOT NULL,      -- md5 of the user id: a caller's text is never an index key
    first_seen timestamptz NOT NULL,
    last_seen  timestamptz NOT NULL,
    PRIMARY KEY (error_id, user_key)
) WITH (fillfactor = 80);
CREATE INDEX idx_error_user_last_seen ON tb_error_user (error_id, last_seen DESC);
-- the hourly prune of users not seen for 31 days reads a range of this, not
-- the whole table (under the fold's lock: counting waits for it)
CREATE INDEX idx_error_user_seen ON tb_error_user (last_seen);

-- Unmerges the fold has still to settle (fraiseql_unmerge_error): how many
-- of the fingerprint's occurrences the target counted is known only under
-- the fold's lock, which no caller's transaction may hold.
CREATE TABLE tb_error_unmerge_request (
    source_id    uuid PRIMARY KEY,
    target_id    uuid NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now()
);

-- ---------------------------------------------------------------------------
-- Counting (see fraiseql_flush_counts in capture.sql). Updating the group row
-- on every capture makes a hot fingerprint a lock convoy, so captures only
-- insert occurrences, and the fold counts them by the transaction that wrote
-- them. The rows counted already: those of every transaction below `above`
-- except the ones in `in_progress`. Counts of groups whose row was busy wait
-- in tb_error_count_pending.
-- ---------------------------------------------------------------------------
CREATE TABLE tb_error_fold_state (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    above       xid8 NOT NULL,
    in_progress xid8[] NOT NULL DEFAULT '{}',
    -- the last time a fold pruned what rules' windows no longer need
    windows_pruned_at timestamptz,
    folded_at   timestamptz
);
-- (its row: _fraiseql_install_rows, finalize.sql)

CREATE TABLE tb_error_count_pending (
    error_id         uuid PRIMARY KEY,
    occurrence_count bigint NOT NULL,
    not_stored       bigint NOT NULL DEFAULT 0,
    first_seen       timestamptz NOT NULL,
    last_seen        timestamptz NOT NULL,
    -- the highest severity among them (a group's severity only rises)
    severity_rank    integer NOT NULL DEFAULT 0,
    -- the latest of them that may reopen the group (a resolved one with a
    -- release condition: the latest that meets it), and its release
    regress_after    timestamptz,
    regress_release  text,
    -- the resolution that condition was evaluated against (resolved_at)
    regress_resolved_at timestamptz,
    -- of occurrence_count, the new occurrences (deletes and merges aside):
    -- what an archive's "N more occurrences" counts
    added            bigint NOT NULL DEFAULT 0
);

-- Releases seen in occurrences (the fold keeps it): what release-aware
-- resolution orders by when a release is not a semantic version, and the
-- regressions each release caused.
CREATE TABLE tb_release (
    release      text PRIMARY KEY,
    first_seen   timestamptz NOT NULL,
    last_seen    timestamptz NOT NULL,
    -- occurrences counted (not decremented by deletes or retention)
    occurrences  bigint NOT NULL DEFAULT 0,
    -- groups it reopened
    regressions  integer NOT NULL DEFAULT 0
);

-- Occurrences deleted since the last fold (DELETE on tb_error_occurrence or
-- monitoring.errors, retention): the fold takes back the ones it had counted.
-- A tombstone commits with its delete, so the fold sees both or neither.
-- n rows of one group per tombstone: rows the fold had counted when they
-- were deleted are one tombstone with capture_xid '0' (counted for good:
-- counting only ever moves forward); the others keep their transaction's id
-- and the fold decides (it may be counting them as they are deleted).
CREATE TABLE tb_error_tombstone (
    error_id    uuid NOT NULL,
    capture_xid xid8 NOT NULL,
    occurred_at timestamptz NOT NULL,   -- the latest of them
    sampled_out boolean NOT NULL,
    n           bigint NOT NULL DEFAULT 1
);

-- A partition of tb_error_occurrence dropped by hand (DROP TABLE, not
-- drop_old_*): its rows went without tombstones, so the fold recounts the
-- groups and the rollups are rebuilt from the rows that remain. One row per
-- consumer ('groups', 'rollups'); insert-only, so the dropping transaction
-- holds no lock the worker needs.
CREATE TABLE tb_recount_request (
    consumer     text NOT NULL CHECK (consumer IN ('groups', 'rollups')),
    partition    text NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now()
);

-- The same for the dashboards' rollups (fraiseql_refresh_rollups, which has
-- its own state): per group, environment and minute, capture_xid '0' for
-- rows it had rolled up.
CREATE TABLE tb_rollup_tombstone (
    error_id    uuid NOT NULL,
    environment text NOT NULL,
    minute      timestamptz NOT NULL,
    capture_xid xid8 NOT NULL,
    n           bigint NOT NULL
);

-- ---------------------------------------------------------------------------
-- Occurrences: one row per capture, monthly partitions (UTC) + a default
-- partition so that a capture dated into a month without a partition is kept.
-- ---------------------------------------------------------------------------
-- ---------------------------------------------------------------------------
-- Indexes of the partitioned tables. They are made on each partition, the
-- parents have none: an index on a partitioned parent (a member of the
-- extension) is re-created on each partition by ATTACH PARTITION when
-- pg_dump's output is restored, and the dump's own CREATE INDEX for the
-- partition then fails. Local indexes restore as they were; and a new
-- partition is indexed before it is attached, so attaching it is quick.
-- (Uniqueness per partition is uniqueness overall: every unique key holds
-- the partition key.)
-- ---------------------------------------------------------------------------
CREATE TABLE tb_partition_index (
    parent_table regclass NOT NULL,
    suffix       text NOT NULL,      -- the index is <partition>_<suffix>
    is_unique    boolean NOT NULL DEFAULT false,
    definition   text NOT NULL,      -- what follows ON <partition>
    PRIMARY KEY (parent_table, suffix)
);

CREATE TABLE tb_error_occurrence (
    occurrence_id   uuid NOT NULL DEFAULT gen_random_uuid(),
    error_id        uuid NOT NULL,
    -- the group's key: the fold creates a group from its first occurrence
    -- (error_id = fraiseql_error_id(fingerprint))
    fingerprint     text NOT NULL,
    occurred_at     timestamptz NOT NULL DEFAULT now(),
    error_type      text NOT NULL,
    message         text NOT NULL,
    stack_trace     text,
    context         jsonb,
    severity        text NOT NULL DEFAULT 'error',
    environment     text NOT NULL,
    release_version text,
    trace_id        text,
    span_id         text,
    resolved        boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- the (top-level) transaction that stored the row: what the fold counts by
    capture_xid     xid8 NOT NULL DEFAULT pg_current_xact_id(),
    -- spike protection: counted, but stored without stack trace and context
    -- (src/spike.rs)
    sampled_out     boolean NOT NULL DEFAULT false
) PARTITION BY RANGE (occurred_at);

CREATE TABLE tb_error_occurrence_default PARTITION OF tb_error_occurrence DEFAULT;

INSERT INTO tb_partition_index (parent_table, suffix, is_unique, definition) VALUES
    ('tb_error_occurrence', 'pkey', true, '(occurrence_id, occurred_at)'),
    ('tb_error_occurrence', 'occurred_at', false, '(occurred_at DESC)'),
    ('tb_error_occurrence', 'error_id', false, '(error_id, occurred_at DESC)'),
    ('tb_error_occurrence', 'environment', false, '(environment, occurred_at DESC)'),
    ('tb_error_occurrence', 'trace_id', false, '(trace_id) WHERE trace_id IS NOT NULL'),
    ('tb_error_occurrence', 'context', false, 'USING gin (context jsonb_path_ops)'),
    ('tb_error_occurrence', 'capture_xid', false, '(capture_xid)');

-- ---------------------------------------------------------------------------
-- Notification rules and delivery log (delivery itself: see notify/*).
-- ---------------------------------------------------------------------------
CREATE TABLE tb_error_notification_config (
    config_id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    error_fingerprint    text,
    error_type           text,
    severity             text[],
    environment          text[],
    channel_type         text NOT NULL,
    channel_config       jsonb NOT NULL DEFAULT '{}'::jsonb,
    rate_limit_minutes   integer NOT NULL DEFAULT 0 CHECK (rate_limit_minutes >= 0),
    min_occurrence_count integer NOT NULL DEFAULT 1 CHECK (min_occurrence_count >= 1),
    message_template     text,
    enabled              boolean NOT NULL DEFAULT true,
    created_at           timestamptz NOT NULL DEFAULT now(),
    last_triggered       timestamptz,
    -- the seed's best-practice rules, as columns
    notify_on_new        boolean NOT NULL DEFAULT false,   -- only a new fingerprint
    notify_on_regression boolean NOT NULL DEFAULT false,   -- only a resolved group recurring
    notify_on_occurrence integer[],                        -- exactly when the count reaches each
    condition            jsonpath,                         -- jsonb_path_match() on the error
    digest               boolean NOT NULL DEFAULT false,   -- one message per rate-limit window
    -- Sentry's alert conditions: "more than frequency_threshold occurrences
    -- and/or more than users_threshold distinct users within
    -- frequency_window" fires once as the group crosses it (again only after
    -- it fell back below); decided by the fold, never on the capture path
    frequency_threshold  integer CHECK (frequency_threshold BETWEEN 0 AND 10000),
    users_threshold      integer CHECK (users_threshold BETWEEN 0 AND 10000),
    frequency_window     interval CHECK (frequency_window > interval '0' AND frequency_window <= interval '30 days'),
    notify_on_escalation boolean NOT NULL DEFAULT false,   -- an archived group escalating
    skip_if_assigned     boolean NOT NULL DEFAULT false    -- not for a group someone owns
);

CREATE TABLE tb_error_notification_log (
    notification_id uuid NOT NULL DEFAULT gen_random_uuid(),
    config_id       uuid NOT NULL,
    error_id        uuid NOT NULL,
    sent_at         timestamptz NOT NULL DEFAULT now(),
    channel_type    text NOT NULL,
    recipient       text,
    status          text NOT NULL CHECK (status IN ('sent', 'failed', 'retrying')),
    error_message   text,
    attempt         integer NOT NULL DEFAULT 1,
    response_code   text,
    duration_ms     integer,
    delivery_id     uuid
) PARTITION BY RANGE (sent_at);

CREATE TABLE tb_error_notification_log_default PARTITION OF tb_error_notification_log DEFAULT;
INSERT INTO tb_partition_index (parent_table, suffix, is_unique, definition) VALUES
    ('tb_error_notification_log', 'pkey', true, '(notification_id, sent_at)'),
    ('tb_error_notification_log', 'sent_at', false, '(sent_at DESC)'),
    ('tb_error_notification_log', 'error_id', false, '(error_id)');

-- ---------------------------------------------------------------------------
-- Partition registry: which tables maintenance manages, by what unit, and
-- which setting holds their retention. Later features add their tables here.
-- ---------------------------------------------------------------------------
CREATE TABLE tb_partition_config (
    parent_table   regclass PRIMARY KEY,
    granularity    text NOT NULL CHECK (granularity IN ('month', 'day')),
    -- setting (GUC) holding how many units to keep; 0 keeps data forever
    retention_guc  text NOT NULL,
    -- error groups are pruned once their occurrences have all aged out
    prune_groups   boolean NOT NULL DEFAULT false
);

-- One row that a maintenance run locks (FOR UPDATE), so that two runs, or a
-- run and a manual partition drop, never overlap. A row lock and not an
-- advisory lock: any role can take any advisory lock and hold it to stop
-- maintenance for good, but locking this row needs UPDATE on the table,
-- which no role is granted.
CREATE TABLE tb_maintenance_lock (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton)
);
INSERT INTO tb_maintenance_lock VALUES (true);

-- ---------------------------------------------------------------------------
-- Maintenance runs, newest first in v_maintenance_runs.
-- ---------------------------------------------------------------------------
CREATE TABLE tb_maintenance_run (
    run_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at     timestamptz,
    duration_ms     double precision,
    triggered_by    text NOT NULL DEFAULT 'manual',
    created         text[] NOT NULL DEFAULT '{}',
    dropped         text[] NOT NULL DEFAULT '{}',
    moved_rows      bigint NOT NULL DEFAULT 0,
    groups_removed  bigint NOT NULL DEFAULT 0,
    skipped         text[] NOT NULL DEFAULT '{}',
    last_error      text
);
CREATE INDEX idx_maintenance_run_started ON tb_maintenance_run (started_at DESC);

-- Each maintenance step of each managed table: when it last ran, and since
-- when it has been failing (a lock held by a session, an error), with the
-- sessions that held the table then (see v_maintenance_steps).
CREATE TABLE tb_maintenance_step (
    parent_table   regclass NOT NULL,
    step           text NOT NULL,
    last_done_at   timestamptz,
    failing_since  timestamptz,
    failures       integer NOT NULL DEFAULT 0,
    last_problem   text,
    blocked_by     integer[],
    warned_at      timestamptz,
    PRIMARY KEY (parent_table, step)
);
