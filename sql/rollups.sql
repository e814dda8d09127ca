-- fraiseql_obs: rollups for the dashboards.
--
-- A dashboard aggregates days of occurrences and spans; reading the raw rows
-- makes a panel cost grow with the data (seconds at ten million rows). The
-- worker keeps these rollups, incrementally and exactly, by the technique that
-- counts occurrences (capture.sql, "Counting"): rows are rolled up by the
-- transaction that wrote them, those its snapshot sees finished that were
-- not rolled up before. The panel functions below add whole buckets from the
-- rollups to the raw rows at the edges of the range and the raw rows not
-- rolled up yet, so they return what the same query over the raw rows would
-- (percentiles excepted: they come from log-scale histograms, within 9%).
--
-- All buckets are UTC.

-- What is rolled up already, as for the counts (tb_error_fold_state): the
-- rows of every transaction below *_above except those in *_in_progress.
CREATE TABLE tb_rollup_state (
    singleton         boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    error_above       xid8 NOT NULL,
    error_in_progress xid8[] NOT NULL DEFAULT '{}',
    span_above        xid8 NOT NULL,
    span_in_progress  xid8[] NOT NULL DEFAULT '{}',
    rolled_at         timestamptz
);
-- (its row: _fraiseql_install_rows, finalize.sql)

-- Occurrences per minute and environment (error rate, errors by environment).
CREATE TABLE tb_rollup_error_minute (
    bucket      timestamptz NOT NULL,
    environment text NOT NULL,
    occurrences bigint NOT NULL,
    PRIMARY KEY (bucket, environment)
);

-- The same per five minutes: long ranges read a fifth of the rows.
CREATE TABLE tb_rollup_error_5min (LIKE tb_rollup_error_minute INCLUDING ALL);

-- Occurrences per hour / day, group and environment (top errors).
CREATE TABLE tb_rollup_error_hour (
    bucket      timestamptz NOT NULL,
    error_id    uuid NOT NULL,
    environment text NOT NULL,
    occurrences bigint NOT NULL,
    PRIMARY KEY (bucket, error_id, environment)
);
CREATE TABLE tb_rollup_error_day (LIKE tb_rollup_error_hour INCLUDING ALL);

-- Spans per minute, environment and kind: 'request' (root spans) and 'db'
-- (spans with attributes {"db.system": "postgresql"}). latency: a histogram
-- (src/rollup.rs).
CREATE TABLE tb_rollup_span_minute (
    bucket       timestamptz NOT NULL,
    environment  text NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('request', 'db')),
    spans        bigint NOT NULL,
    errors       bigint NOT NULL,   -- status_code 2
    oks          bigint NOT NULL,   -- status_code 1
    duration_sum double precision NOT NULL,
    latency      bigint[] NOT NULL,
    PRIMARY KEY (bucket, environment, kind)
);
CREATE TABLE tb_rollup_span_5min (LIKE tb_rollup_span_minute INCLUDING ALL);

-- Spans per hour, environment and operation (slowest operations, error rate
-- by operation). requests: root spans; requests_with_errors: those whose
-- trace has an error occurrence.
CREATE TABLE tb_rollup_operation_hour (
    bucket               timestamptz NOT NULL,
    environment          text NOT NULL,
    operation_name       text NOT NULL,
    spans                bigint NOT NULL,
    duration_max         double precision NOT NULL,
    latency              bigint[] NOT NULL,
    requests             bigint NOT NULL,
    requests_with_errors bigint NOT NULL,
    PRIMARY KEY (bucket, environment, operation_name)
);

-- Traces known to have an error occurrence: a request is counted as failed
-- once, whichever of its span and its first error is rolled up first.
CREATE TABLE tb_trace_error (
    trace_id   text PRIMARY KEY,
    first_seen timestamptz NOT NULL
);
CREATE INDEX idx_trace_error_first_seen ON tb_trace_error (first_seen);

CREATE AGGREGATE fraiseql_hist_merge_agg(bigint[]) (sfunc = _fraiseql_hist_merge, stype = bigint[]);

-- One roll-up round: spans first, then occurrences (so that a request and
-- its first error rolled up in the same round are matched once). The worker
-- runs it every flush_interval; anyone may run it. Never waits: a concurrent
-- round makes it return at once.
CREATE FUNCTION fraiseql_refresh_rollups() RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off  -- (see the worker's settings)
SET TimeZone = 'UTC'
AS $$
DECLARE
    v_state  record;
    v_spans  bigint;
    v_errors bigint;
    v_back   @extschema@.tb_rollup_tombstone[];
    v_lo     timestamptz;
    v_hi     timestamptz;
    v_rebuild boolean;
BEGIN
    -- one run at a time, without a transaction id (see fraiseql_flush_counts)
    BEGIN
        LOCK TABLE @extschema@.tb_rollup_state IN SHARE ROW EXCLUSIVE MODE NOWAIT;
    EXCEPTION WHEN lock_not_available THEN
        RETURN jsonb_build_object('busy', true);
    END;
    SELECT * INTO v_state FROM @extschema@.tb_rollup_state;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('busy', true);  -- a restore in progress has not brought the state yet
    END IF;
    -- A partition of the occurrences dropped by hand (tb_recount_request):
    -- the error rollups are made again from the rows that remain, as if
    -- none had been rolled up.
    WITH req AS (
        DELETE FROM @extschema@.tb_recount_request r WHERE r.consumer = 'rollups' RETURNING 1
    )
    SELECT count(*) > 0 INTO v_rebuild FROM req;
    IF v_rebuild THEN
        DELETE FROM @extschema@.tb_rollup_error_minute;
        DELETE FROM @extschema@.tb_rollup_error_5min;
        DELETE FROM @extschema@.tb_rollup_error_hour;
        DELETE FROM @extschema@.tb_rollup_error_day;
        v_state.error_above := '0';
        v_state.error_in_progress := '{}';
    END IF;

    -- spans restored from another cluster's dump (see fraiseql_flush_counts)
    UPDATE monitoring.traces t SET ingest_xid = '0'
     WHERE t.ingest_xid >= pg_snapshot_xmax(pg_current_snapshot())
       AND t.ingest_xid <> coalesce(pg_current_xact_id_if_assigned(), '0');

    WITH cur AS (
        SELECT pg_current_snapshot() AS snap
    ), new AS MATERIALIZED (
        SELECT t.trace_id, t.operation_name, t.start_time, t.duration_ms, t.status_code, t.environment,
               t.parent_span_id IS NULL AS is_request,
               t.attributes @> '{"db.system": "postgresql"}' AS is_db,
               @extschema@._fraiseql_latency_bucket(t.duration_ms) AS b
          FROM monitoring.traces t, cur
         WHERE (t.ingest_xid >= v_state.span_above OR t.ingest_xid = ANY (v_state.span_in_progress))
           AND pg_visible_in_snapshot(t.ingest_xid, cur.snap)
    ), by_bucket AS (
        SELECT date_trunc('minute', n.start_time) AS bucket, n.environment, k.kind, n.b,
               count(*) AS spans, count(*) FILTER (WHERE n.status_code = 2) AS errors,
               count(*) FILTER (WHERE n.status_code = 1) AS oks, sum(n.duration_ms) AS duration_sum
          FROM new n, LATERAL (VALUES ('request', n.is_request), ('db', n.is_db)) k(kind, applies)
         WHERE k.applies
         GROUP BY 1, 2, 3, 4
    ), minutes AS (
        INSERT INTO @extschema@.tb_rollup_span_minute AS r (bucket, environment, kind, spans, errors, oks, duration_sum, latency)
        SELECT bucket, environment, kind, sum(spans), sum(errors), sum(oks), sum(duration_sum),
               @extschema@._fraiseql_hist_from(array_agg(b), array_agg(spans))
          FROM by_bucket GROUP BY 1, 2, 3
        ON CONFLICT (bucket, environment, kind) DO UPDATE
           SET spans = r.spans + excluded.spans, errors = r.errors + excluded.errors, oks = r.oks + excluded.oks,
               duration_sum = r.duration_sum + excluded.duration_sum,
               latency = @extschema@._fraiseql_hist_merge(r.latency, excluded.latency)
    ), five_minutes AS (
        INSERT INTO @extschema@.tb_rollup_span_5min AS r (bucket, environment, kind, spans, errors, oks, duration_sum, latency)
        SELECT x.bucket, x.environment, x.kind, sum(x.spans), sum(x.errors), sum(x.oks), sum(x.duration_sum),
               @extschema@._fraiseql_hist_from(array_agg(x.b), array_agg(x.spans))
          FROM (SELECT date_bin('5 minutes', y.bucket, '2000-01-01 00:00:00+00') AS bucket, y.environment, y.kind, y.b,
                       sum(y.spans)::bigint AS spans, sum(y.errors) AS errors, sum(y.oks) AS oks,
                       sum(y.duration_sum) AS duration_sum
                  FROM by_bucket y GROUP BY 1, 2, 3, 4) x
         GROUP BY 1, 2, 3
        ON CONFLICT (bucket, environment, kind) DO UPDATE
           SET spans = r.spans + excluded.spans, errors = r.errors + excluded.errors, oks = r.oks + excluded.oks,
               duration_sum = r.duration_sum + excluded.duration_sum,
               latency = @extschema@._fraiseql_hist_merge(r.latency, excluded.latency)
    ), by_operation AS (
        SELECT date_trunc('hour', n.start_time) AS bucket, n.environment, n.operation_name, n.b,
               count(*) AS spans, max(n.duration_ms) AS duration_max,
               count(*) FILTER (WHERE n.is_request) AS requests,
               count(*) FILTER (WHERE n.is_request AND m.trace_id IS NOT NULL) AS with_errors
          FROM new n LEFT JOIN @extschema@.tb_trace_error m ON m.trace_id = n.trace_id AND n.is_request
         GROUP BY 1, 2, 3, 4
    ), operations AS (
        INSERT INTO @extschema@.tb_rollup_operation_hour AS r
            (bucket, environment, operation_name, spans, duration_max, latency, requests, requests_with_errors)
        SELECT bucket, environment, operation_name, sum(spans), max(duration_max),
               @extschema@._fraiseql_hist_from(array_agg(b), array_agg(spans)), sum(requests), sum(with_errors)
          FROM by_operation GROUP BY 1, 2, 3
        ON CONFLICT (bucket, environment, operation_name) DO UPDATE
           SET spans = r.spans + excluded.spans, duration_max = greatest(r.duration_max, excluded.duration_max),
               latency = @extschema@._fraiseql_hist_merge(r.latency, excluded.latency),
               requests = r.requests + excluded.requests,
               requests_with_errors = r.requests_with_errors + excluded.requests_with_errors
    ), moved AS (
        UPDATE @extschema@.tb_rollup_state s
           SET span_above = greatest(v_state.span_above, pg_snapshot_xmax(cur.snap)),
               span_in_progress = @extschema@._fraiseql_still_running(cur.snap, v_state.span_above,
                                                                      v_state.span_in_progress)
          FROM cur
         WHERE EXISTS (SELECT 1 FROM new)
        RETURNING 1
    )
    SELECT count(*) INTO v_spans FROM new;

    WITH cur AS (
        SELECT pg_current_snapshot() AS snap
    ), new AS MATERIALIZED (
        SELECT o.error_id, o.environment, o.occurred_at, o.trace_id
          FROM @extschema@.tb_error_occurrence o, cur
         WHERE (o.capture_xid >= v_state.error_above OR o.capture_xid = ANY (v_state.error_in_progress))
           AND pg_visible_in_snapshot(o.capture_xid, cur.snap)
    ), minutes AS (
        INSERT INTO @extschema@.tb_rollup_error_minute AS r (bucket, environment, occurrences)
        SELECT date_trunc('minute', occurred_at), environment, count(*) FROM new GROUP BY 1, 2
        ON CONFLICT (bucket, environment) DO UPDATE SET occurrences = r.occurrences + excluded.occurrences
    ), five_minutes AS (
        INSERT INTO @extschema@.tb_rollup_error_5min AS r (bucket, environment, occurrences)
        SELECT date_bin('5 minutes', occurred_at, '2000-01-01 00:00:00+00'), environment, count(*) FROM new GROUP BY 1, 2
        ON CONFLICT (bucket, environment) DO UPDATE SET occurrences = r.occurrences + excluded.occurrences
    ), hours AS (
        INSERT INTO @extschema@.tb_rollup_error_hour AS r (bucket, error_id, environment, occurrences)
        SELECT date_trunc('hour', occurred_at), error_id, environment, count(*) FROM new GROUP BY 1, 2, 3
        ON CONFLICT (bucket, error_id, environment) DO UPDATE SET occurrences = r.occurrences + excluded.occurrences
    ), days AS (
        INSERT INTO @extschema@.tb_rollup_error_day AS r (bucket, error_id, environment, occurrences)
        SELECT date_trunc('day', occurred_at), error_id, environment, count(*) FROM new GROUP BY 1, 2, 3
        ON CONFLICT (bucket, error_id, environment) DO UPDATE SET occurrences = r.occurrences + excluded.occurrences
    ), marks AS (
        INSERT INTO @extschema@.tb_trace_error AS m (trace_id, first_seen)
        SELECT trace_id, min(occurred_at) FROM new WHERE trace_id IS NOT NULL GROUP BY trace_id
        ON CONFLICT (trace_id) DO NOTHING
        RETURNING m.trace_id
    ), late AS (
        -- requests rolled up before their trace's first error
        SELECT date_trunc('hour', t.start_time) AS bucket, t.environment, t.operation_name, count(*) AS n
          FROM marks JOIN monitoring.traces t ON t.trace_id = marks.trace_id
         WHERE t.parent_span_id IS NULL
           -- (the state as the span part above left it)
           AND NOT (t.ingest_xid >= (SELECT s.span_above FROM @extschema@.tb_rollup_state s)
                    OR t.ingest_xid = ANY ((SELECT s.span_in_progress FROM @extschema@.tb_rollup_state s)::xid8[]))
         GROUP BY 1, 2, 3
    ), late_counted AS (
        UPDATE @extschema@.tb_rollup_operation_hour r SET requests_with_errors = r.requests_with_errors + late.n
          FROM late
         WHERE r.bucket = late.bucket AND r.environment = late.environment AND r.operation_name = late.operation_name
        RETURNING 1
    ), gone AS (
        -- deletes committed in this snapshot: their rows are not in new
        DELETE FROM @extschema@.tb_rollup_tombstone t RETURNING t.*
    ), moved AS (
        UPDATE @extschema@.tb_rollup_state s
           SET error_above = greatest(v_state.error_above, pg_snapshot_xmax(cur.snap)),
               error_in_progress = @extschema@._fraiseql_still_running(cur.snap, v_state.error_above,
                                                                       v_state.error_in_progress),
               rolled_at = now()
          FROM cur
         WHERE EXISTS (SELECT 1 FROM new)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM new),
           (SELECT array_agg(g) FROM gone g
             WHERE g.capture_xid < v_state.error_above AND NOT g.capture_xid = ANY (v_state.error_in_progress))
      INTO v_errors, v_back;

    -- Deleted rows it had rolled up are taken back from their buckets (the
    -- buckets that are still there: a pruned one went with its rows).
    IF v_back IS NOT NULL THEN
        WITH b AS (
            SELECT t.error_id, t.environment, t.minute, t.n FROM unnest(v_back) t
        ), minutes AS (
            UPDATE @extschema@.tb_rollup_error_minute r SET occurrences = greatest(r.occurrences - x.n, 0)
              FROM (SELECT b.minute AS bucket, b.environment, sum(b.n) AS n FROM b GROUP BY 1, 2) x
             WHERE r.bucket = x.bucket AND r.environment = x.environment
        ), five_minutes AS (
            UPDATE @extschema@.tb_rollup_error_5min r SET occurrences = greatest(r.occurrences - x.n, 0)
              FROM (SELECT date_bin('5 minutes', b.minute, '2000-01-01 00:00:00+00') AS bucket, b.environment,
                           sum(b.n) AS n FROM b GROUP BY 1, 2) x
             WHERE r.bucket = x.bucket AND r.environment = x.environment
        ), hours AS (
            UPDATE @extschema@.tb_rollup_error_hour r SET occurrences = greatest(r.occurrences - x.n, 0)
              FROM (SELECT date_trunc('hour', b.minute) AS bucket, b.error_id, b.environment, sum(b.n) AS n
                      FROM b GROUP BY 1, 2, 3) x
             WHERE r.bucket = x.bucket AND r.error_id = x.error_id AND r.environment = x.environment
        )
        UPDATE @extschema@.tb_rollup_error_day r SET occurrences = greatest(r.occurrences - x.n, 0)
          FROM (SELECT date_trunc('day', b.minute) AS bucket, b.error_id, b.environment, sum(b.n) AS n
                  FROM b GROUP BY 1, 2, 3) x
         WHERE r.bucket = x.bucket AND r.error_id = x.error_id AND r.environment = x.environment;
        -- a bucket left empty is no bucket (a panel shows no point for it)
        SELECT min(t.minute), max(t.minute) INTO v_lo, v_hi FROM unnest(v_back) t;
        DELETE FROM @extschema@.tb_rollup_error_minute r
         WHERE r.bucket BETWEEN v_lo AND v_hi AND r.occurrences = 0;
        DELETE FROM @extschema@.tb_rollup_error_5min r
         WHERE r.bucket BETWEEN date_bin('5 minutes', v_lo, '2000-01-01 00:00:00+00') AND v_hi AND r.occurrences = 0;
        DELETE FROM @extschema@.tb_rollup_error_hour r
         WHERE r.bucket BETWEEN date_trunc('hour', v_lo) AND v_hi AND r.occurrences = 0;
        DELETE FROM @extschema@.tb_rollup_error_day r
         WHERE r.bucket BETWEEN date_trunc('day', v_lo) AND v_hi AND r.occurrences = 0;
    END IF;

    RETURN jsonb_build_object('spans', v_spans, 'occurrences', v_errors);
END
$$;

-- Rollups live as long as the rows they summarize (maintenance calls this).
CREATE FUNCTION _fraiseql_prune_rollups() RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
AS $$
DECLARE
    v_errors timestamptz := date_trunc('month', now())
        - @extschema@.fraiseql_setting('fraiseql_obs.error_retention_months')::integer * interval '1 month';
    v_spans  timestamptz := date_trunc('day', now())
        - @extschema@.fraiseql_setting('fraiseql_obs.trace_retention_days')::integer * interval '1 day';
BEGIN
    IF @extschema@.fraiseql_setting('fraiseql_obs.error_retention_months')::integer > 0 THEN
        DELETE FROM @extschema@.tb_rollup_error_minute WHERE bucket < v_errors;
        DELETE FROM @extschema@.tb_rollup_error_5min WHERE bucket < v_errors;
        DELETE FROM @extschema@.tb_rollup_error_hour WHERE bucket < v_errors;
        DELETE FROM @extschema@.tb_rollup_error_day WHERE bucket < v_errors;
    END IF;
    IF @extschema@.fraiseql_setting('fraiseql_obs.trace_retention_days')::integer > 0 THEN
        DELETE FROM @extschema@.tb_rollup_span_minute WHERE bucket < v_spans;
        DELETE FROM @extschema@.tb_rollup_span_5min WHERE bucket < v_spans;
        DELETE FROM @extschema@.tb_rollup_operation_hour WHERE bucket < v_spans;
        DELETE FROM @extschema@.tb_trace_error WHERE first_seen < v_spans;
    END IF;
END
$$;

-- ---------------------------------------------------------------------------
-- Panel functions: what the dashboards run (grafana/build.py). Each takes the
-- range as Grafana gives it (both ends included, like $__timeFilter) and,
-- where it matters, the environments to show (NULL: all).
-- ---------------------------------------------------------------------------

-- The whole buckets of p_width (aligned on UTC midnight) inside [p_from,
-- p_to], as [lo, hi); when there are none (or p_use is false), lo = hi = just
-- after p_to, so that the raw part [p_from, lo) covers the whole range.
CREATE FUNCTION _fraiseql_whole_units(p_from timestamptz, p_to timestamptz, p_width interval, p_use boolean DEFAULT true,
                                      OUT lo timestamptz, OUT hi timestamptz)
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN p_use AND l < h THEN l ELSE p_to + interval '1 microsecond' END,
           CASE WHEN p_use AND l < h THEN h ELSE p_to + interval '1 microsecond' END
      FROM (SELECT CASE WHEN date_bin(p_width, p_from, '2000-01-01 00:00:00+00') = p_from THEN p_from
                        ELSE date_bin(p_width, p_from, '2000-01-01 00:00:00+00') + p_width END AS l,
                   date_bin(p_width, p_to, '2000-01-01 00:00:00+00') AS h) x
$$;

-- Time bucket of Grafana's $__timeGroup for an interval in milliseconds.
CREATE FUNCTION _fraiseql_time_group(t timestamptz, p_interval_ms bigint) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT to_timestamp(floor(extract(epoch FROM t) / (greatest(p_interval_ms, 1) / 1000.0)) * (greatest(p_interval_ms, 1) / 1000.0))
$$;

-- The raw rows a panel adds to the whole buckets [p_lo, p_hi) it reads from a
-- rollup: the rows of the range outside them, and the rows inside them not
-- rolled up yet (p_above, p_in_progress: the rollup's state). Plain SQL without SET, so that
-- the planner inlines them into the panel's query.
CREATE FUNCTION _fraiseql_raw_occurrences(p_from timestamptz, p_to timestamptz, p_lo timestamptz, p_hi timestamptz,
                                          p_above xid8, p_in_progress xid8[], p_environments text[])
RETURNS TABLE (error_id uuid, occurred_at timestamptz, environment text)
LANGUAGE sql STABLE
AS $$
    SELECT o.error_id, o.occurred_at, o.environment FROM @extschema@.tb_error_occurrence o
     WHERE o.occurred_at >= p_from AND o.occurred_at < p_lo
       AND (p_environments IS NULL OR o.environment = ANY (p_environments))
    UNION ALL
    SELECT o.error_id, o.occurred_at, o.environment FROM @extschema@.tb_error_occurrence o
     WHERE o.occurred_at >= p_hi AND o.occurred_at <= p_to
       AND (p_environments IS NULL OR o.environment = ANY (p_environments))
    UNION ALL
    SELECT o.error_id, o.occurred_at, o.environment FROM @extschema@.tb_error_occurrence o
     WHERE (o.capture_xid >= p_above OR o.capture_xid = ANY (p_in_progress))
       AND o.occurred_at >= p_lo AND o.occurred_at < p_hi
       AND (p_environments IS NULL OR o.environment = ANY (p_environments))
$$;

CREATE FUNCTION _fraiseql_raw_spans(p_from timestamptz, p_to timestamptz, p_lo timestamptz, p_hi timestamptz,
                                    p_above xid8, p_in_progress xid8[], p_environments text[])
RETURNS TABLE (trace_id text, operation_name text, start_time timestamptz, duration_ms double precision,
               status_code integer, is_request boolean, is_db boolean)
LANGUAGE sql STABLE
AS $$
    SELECT t.trace_id, t.operation_name, t.start_time, t.duration_ms, t.status_code, t.parent_span_id IS NULL,
           t.attributes @> '{"db.system": "postgresql"}'
      FROM monitoring.traces t
     WHERE t.start_time >= p_from AND t.start_time < p_lo
       AND (p_environments IS NULL OR t.environment = ANY (p_environments))
    UNION ALL
    SELECT t.trace_id, t.operation_name, t.start_time, t.duration_ms, t.status_code, t.parent_span_id IS NULL,
           t.attributes @> '{"db.system": "postgresql"}'
      FROM monitoring.traces t
     WHERE t.start_time >= p_hi AND t.start_time <= p_to
       AND (p_environments IS NULL OR t.environment = ANY (p_environments))
    UNION ALL
    SELECT t.trace_id, t.operation_name, t.start_time, t.duration_ms, t.status_code, t.parent_span_id IS NULL,
           t.attributes @> '{"db.system": "postgresql"}'
      FROM monitoring.traces t
     WHERE (t.ingest_xid >= p_above OR t.ingest_xid = ANY (p_in_progress))
       AND t.start_time >= p_lo AND t.start_time < p_hi
       AND (p_environments IS NULL OR t.environment = ANY (p_environments))
$$;

-- Occurrences per time bucket.
CREATE FUNCTION fraiseql_panel_error_rate(p_from timestamptz, p_to timestamptz, p_interval_ms bigint,
                                          p_environments text[] DEFAULT NULL)
RETURNS TABLE ("time" timestamptz, errors bigint)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
-- planned for the actual range and horizon each time (a generic plan guesses them)
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    v_h xid8 := (SELECT s.error_above FROM @extschema@.tb_rollup_state s);
    v_hp xid8[] := (SELECT s.error_in_progress FROM @extschema@.tb_rollup_state s);
    -- buckets serve the intervals they divide: five minutes, else one
    v_five boolean := p_interval_ms % 300000 = 0;
    w record := @extschema@._fraiseql_whole_units(p_from, p_to, CASE WHEN v_five THEN interval '5 minutes' ELSE interval '1 minute' END,
                                      p_interval_ms % 60000 = 0);
BEGIN
    RETURN QUERY
    SELECT @extschema@._fraiseql_time_group(x.t, p_interval_ms), sum(x.n)::bigint
      FROM (SELECT r.bucket AS t, r.occurrences AS n FROM @extschema@.tb_rollup_error_5min r
             WHERE v_five AND r.bucket >= w.lo AND r.bucket < w.hi
               AND (p_environments IS NULL OR r.environment = ANY (p_environments))
            UNION ALL
            SELECT r.bucket AS t, r.occurrences AS n FROM @extschema@.tb_rollup_error_minute r
             WHERE NOT v_five AND r.bucket >= w.lo AND r.bucket < w.hi
               AND (p_environments IS NULL OR r.environment = ANY (p_environments))
            UNION ALL
            SELECT o.occurred_at, 1 FROM @extschema@._fraiseql_raw_occurrences(p_from, p_to, w.lo, w.hi, v_h, v_hp, p_environments) o) x
     GROUP BY 1 ORDER BY 1;
END
$$;

-- Occurrences per environment.
CREATE FUNCTION fraiseql_panel_errors_by_environment(p_from timestamptz, p_to timestamptz)
RETURNS TABLE (environment text, errors bigint)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
-- planned for the actual range and horizon each time (a generic plan guesses them)
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    v_h xid8 := (SELECT s.error_above FROM @extschema@.tb_rollup_state s);
    v_hp xid8[] := (SELECT s.error_in_progress FROM @extschema@.tb_rollup_state s);
    w record := @extschema@._fraiseql_whole_units(p_from, p_to, interval '5 minutes');
BEGIN
    RETURN QUERY
    SELECT x.environment, sum(x.n)::bigint
      FROM (SELECT r.environment, r.occurrences AS n FROM @extschema@.tb_rollup_error_5min r
             WHERE r.bucket >= w.lo AND r.bucket < w.hi
            UNION ALL
            SELECT o.environment, 1 FROM @extschema@._fraiseql_raw_occurrences(p_from, p_to, w.lo, w.hi, v_h, v_hp, NULL) o) x
     GROUP BY 1 ORDER BY 2 DESC;
END
$$;

-- The most frequent error groups of the range, with the distinct users
-- (context.user_id, or user.id of a Sentry event) they affected. Candidates are ranked by the buckets
-- overlapping the range (days for ranges of three days or more, hours below)
-- plus the rows not rolled up yet; the figures returned are then counted
-- exactly over the range from the candidates' own occurrences.
CREATE FUNCTION fraiseql_panel_top_errors(p_from timestamptz, p_to timestamptz,
                                          p_environments text[] DEFAULT NULL, p_limit integer DEFAULT 10)
RETURNS TABLE (error_id uuid, occurrences bigint, users_affected bigint, last_seen timestamptz)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
-- planned for the actual range and horizon each time (a generic plan guesses them)
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    v_daily boolean := p_to - p_from >= interval '3 days';
    v_h xid8 := (SELECT s.error_above FROM @extschema@.tb_rollup_state s);
    v_hp xid8[] := (SELECT s.error_in_progress FROM @extschema@.tb_rollup_state s);
BEGIN
    RETURN QUERY
    WITH candidates AS (
        -- (by group: a merged fingerprint's rows count for its target)
        SELECT coalesce(m.target_id, c.error_id) AS error_id
          FROM (SELECT r.error_id, r.occurrences FROM @extschema@.tb_rollup_error_day r
                 WHERE v_daily AND r.bucket >= date_trunc('day', p_from, 'UTC') AND r.bucket <= p_to
                   AND (p_environments IS NULL OR r.environment = ANY (p_environments))
                UNION ALL
                SELECT r.error_id, r.occurrences FROM @extschema@.tb_rollup_error_hour r
                 WHERE NOT v_daily AND r.bucket >= date_trunc('hour', p_from, 'UTC') AND r.bucket <= p_to
                   AND (p_environments IS NULL OR r.environment = ANY (p_environments))
                UNION ALL
                SELECT o.error_id, 1 FROM @extschema@.tb_error_occurrence o
                 WHERE (o.capture_xid >= v_h OR o.capture_xid = ANY (v_hp)) AND o.occurred_at >= p_from AND o.occurred_at <= p_to
                   AND (p_environments IS NULL OR o.environment = ANY (p_environments))) c
          LEFT JOIN @extschema@.tb_error_merge m ON m.source_id = c.error_id
         GROUP BY 1
         ORDER BY sum(c.occurrences) DESC
         LIMIT p_limit + 3
    )
    -- one index range scan per candidate (never a scan of the whole range)
    SELECT c.error_id, x.n, x.users, x.last_seen
      FROM candidates c,
           LATERAL (SELECT count(*) AS n, count(DISTINCT @extschema@._fraiseql_user_of(o.context)) AS users, max(o.occurred_at) AS last_seen
                      FROM @extschema@.tb_error_occurrence o
                     WHERE o.error_id = ANY (ARRAY(SELECT m.source_id FROM @extschema@.tb_error_merge m
                                                    WHERE m.target_id = c.error_id) || c.error_id)
                       AND o.occurred_at >= p_from AND o.occurred_at <= p_to
                       AND (p_environments IS NULL OR o.environment = ANY (p_environments))) x
     WHERE x.n > 0
     ORDER BY 2 DESC, 1
     LIMIT p_limit;
END
$$;

-- Spans of one kind ('request': root spans; 'db': database spans) per time
-- bucket: count, by status, mean and percentiles of the duration.
CREATE FUNCTION fraiseql_panel_spans(p_from timestamptz, p_to timestamptz, p_interval_ms bigint,
                                     p_environments text[] DEFAULT NULL, p_kind text DEFAULT 'request')
RETURNS TABLE ("time" timestamptz, spans bigint, errors bigint, oks bigint,
               avg_ms double precision, p50_ms double precision, p95_ms double precision, p99_ms double precision)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
-- planned for the actual range and horizon each time (a generic plan guesses them)
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    v_h xid8 := (SELECT s.span_above FROM @extschema@.tb_rollup_state s);
    v_hp xid8[] := (SELECT s.span_in_progress FROM @extschema@.tb_rollup_state s);
    v_five boolean := p_interval_ms % 300000 = 0;
    w record := @extschema@._fraiseql_whole_units(p_from, p_to, CASE WHEN v_five THEN interval '5 minutes' ELSE interval '1 minute' END,
                                      p_interval_ms % 60000 = 0);
BEGIN
    IF p_kind NOT IN ('request', 'db') THEN
        RAISE EXCEPTION 'fraiseql_obs: kind must be ''request'' or ''db'', got %', p_kind
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    WITH raw AS (
        SELECT t.start_time, t.status_code, t.duration_ms
          FROM @extschema@._fraiseql_raw_spans(p_from, p_to, w.lo, w.hi, v_h, v_hp, p_environments) t
         WHERE CASE p_kind WHEN 'request' THEN t.is_request ELSE t.is_db END
    ), parts AS (
        SELECT r.bucket AS t, r.spans, r.errors, r.oks, r.duration_sum, r.latency FROM @extschema@.tb_rollup_span_5min r
         WHERE v_five AND r.kind = p_kind AND r.bucket >= w.lo AND r.bucket < w.hi
           AND (p_environments IS NULL OR r.environment = ANY (p_environments))
        UNION ALL
        SELECT r.bucket AS t, r.spans, r.errors, r.oks, r.duration_sum, r.latency FROM @extschema@.tb_rollup_span_minute r
         WHERE NOT v_five AND r.kind = p_kind AND r.bucket >= w.lo AND r.bucket < w.hi
           AND (p_environments IS NULL OR r.environment = ANY (p_environments))
        UNION ALL
        SELECT @extschema@._fraiseql_time_group(raw.start_time, p_interval_ms), count(*), count(*) FILTER (WHERE raw.status_code = 2),
               count(*) FILTER (WHERE raw.status_code = 1), sum(raw.duration_ms),
               @extschema@._fraiseql_hist_from(array_agg(@extschema@._fraiseql_latency_bucket(raw.duration_ms)), array_agg(1::bigint))
          FROM raw GROUP BY 1
    ), buckets AS (
        SELECT @extschema@._fraiseql_time_group(p.t, p_interval_ms) AS t, sum(p.spans)::bigint AS spans,
               sum(p.errors)::bigint AS errors, sum(p.oks)::bigint AS oks,
               sum(p.duration_sum) / nullif(sum(p.spans), 0) AS avg_ms, @extschema@.fraiseql_hist_merge_agg(p.latency) AS h
          FROM parts p GROUP BY 1
    )
    SELECT b.t, b.spans, b.errors, b.oks, b.avg_ms, @extschema@.fraiseql_hist_quantile(b.h, 0.50),
           @extschema@.fraiseql_hist_quantile(b.h, 0.95), @extschema@.fraiseql_hist_quantile(b.h, 0.99)
      FROM buckets b ORDER BY 1;
END
$$;

-- Per operation over the range: spans, p95 and max duration, requests (root
-- spans) and those whose trace has an error occurrence.
CREATE FUNCTION fraiseql_panel_operations(p_from timestamptz, p_to timestamptz, p_environments text[] DEFAULT NULL)
RETURNS TABLE (operation_name text, spans bigint, p95_ms double precision, max_ms double precision,
               requests bigint, requests_with_errors bigint)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
-- planned for the actual range and horizon each time (a generic plan guesses them)
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    w record := @extschema@._fraiseql_whole_units(p_from, p_to, interval '1 hour');
    v_h xid8 := (SELECT s.span_above FROM @extschema@.tb_rollup_state s);
    v_hp xid8[] := (SELECT s.span_in_progress FROM @extschema@.tb_rollup_state s);
    v_eh xid8 := (SELECT s.error_above FROM @extschema@.tb_rollup_state s);
    v_ehp xid8[] := (SELECT s.error_in_progress FROM @extschema@.tb_rollup_state s);
BEGIN
    RETURN QUERY
    WITH raw AS (
        SELECT t.operation_name, t.duration_ms, t.is_request, t.trace_id
          FROM @extschema@._fraiseql_raw_spans(p_from, p_to, w.lo, w.hi, v_h, v_hp, p_environments) t
    ), parts AS (
        SELECT r.operation_name, r.spans, r.duration_max, r.latency, r.requests, r.requests_with_errors
          FROM @extschema@.tb_rollup_operation_hour r
         WHERE r.bucket >= w.lo AND r.bucket < w.hi
           AND (p_environments IS NULL OR r.environment = ANY (p_environments))
        UNION ALL
        SELECT raw.operation_name, count(*), max(raw.duration_ms),
               @extschema@._fraiseql_hist_from(array_agg(@extschema@._fraiseql_latency_bucket(raw.duration_ms)), array_agg(1::bigint)),
               count(*) FILTER (WHERE raw.is_request),
               count(*) FILTER (WHERE raw.is_request AND EXISTS (
                   SELECT 1 FROM @extschema@.tb_error_occurrence o WHERE o.trace_id = raw.trace_id))
          FROM raw GROUP BY 1
        UNION ALL
        -- rolled-up requests whose trace's first error is not rolled up yet
        SELECT t.operation_name, 0, NULL, NULL, 0, count(*)
          FROM monitoring.traces t
         WHERE t.trace_id IN (SELECT o.trace_id FROM @extschema@.tb_error_occurrence o
                               WHERE (o.capture_xid >= v_eh OR o.capture_xid = ANY (v_ehp)) AND o.trace_id IS NOT NULL
                                 AND NOT EXISTS (SELECT 1 FROM @extschema@.tb_trace_error m WHERE m.trace_id = o.trace_id))
           AND t.parent_span_id IS NULL AND NOT (t.ingest_xid >= v_h OR t.ingest_xid = ANY (v_hp))
           AND t.start_time >= w.lo AND t.start_time < w.hi
           AND (p_environments IS NULL OR t.environment = ANY (p_environments))
         GROUP BY 1
    )
    SELECT p.operation_name, sum(p.spans)::bigint, @extschema@.fraiseql_hist_quantile(@extschema@.fraiseql_hist_merge_agg(p.latency), 0.95),
           max(p.duration_max), sum(p.requests)::bigint, sum(p.requests_with_errors)::bigint
      FROM parts p GROUP BY 1;
END
$$;
