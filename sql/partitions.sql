-- fraiseql_obs: partition management.
--
-- Every function here finds partitions through pg_inherits from the parent's
-- OID (never by name in `public`), reads their bounds from the catalog, and
-- runs with TimeZone = UTC so months and days are UTC months and days whatever
-- the session's or server's time zone.

-- Bounds of one partition; both NULL for a DEFAULT partition.
CREATE FUNCTION _fraiseql_partition_bounds(part regclass,
                                           OUT lower_bound timestamptz,
                                           OUT upper_bound timestamptz)
LANGUAGE plpgsql STABLE
SET TimeZone = 'UTC'
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m text[];
BEGIN
    SELECT regexp_match(pg_get_expr(c.relpartbound, c.oid),
                        $re$FROM \('([^']+)'\) TO \('([^']+)'\)$re$)
      INTO m
      FROM pg_class c WHERE c.oid = part;
    IF m IS NOT NULL THEN
        lower_bound := m[1]::timestamptz;
        upper_bound := m[2]::timestamptz;
    END IF;
END
$$;

-- Every partition of every managed table, with its bounds.
CREATE VIEW v_partitions AS
SELECT p.parent_table,
       c.oid::regclass                      AS partition,
       c.relname::text                      AS partition_name,
       b.lower_bound,
       b.upper_bound,
       pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT' AS is_default
  FROM tb_partition_config p
  JOIN pg_inherits i ON i.inhparent = p.parent_table
  JOIN pg_class c ON c.oid = i.inhrelid
  CROSS JOIN LATERAL _fraiseql_partition_bounds(c.oid::regclass) b;

-- The registry row of a managed table, or a clear error.
CREATE FUNCTION _fraiseql_partition_config(parent regclass)
RETURNS tb_partition_config
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cfg @extschema@.tb_partition_config;
BEGIN
    SELECT * INTO cfg FROM @extschema@.tb_partition_config WHERE parent_table = parent;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'fraiseql_obs: % is not a table managed by fraiseql_obs', parent
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Managed tables are listed in tb_partition_config.';
    END IF;
    RETURN cfg;
END
$$;

-- Name of the partitioning column ("occurred_at", "sent_at", ...).
CREATE FUNCTION _fraiseql_partition_key(parent regclass) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT a.attname::text
      FROM pg_partitioned_table p
      JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = p.partattrs[0]
     WHERE p.partrelid = parent
$$;

CREATE FUNCTION _fraiseql_default_partition(parent regclass) RETURNS regclass
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT c.oid::regclass
      FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
     WHERE i.inhparent = parent
       AND pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT'
$$;

-- Create (idempotently) the partition of `parent` that holds `target`.
-- Rows already sitting in the default partition for that range are moved
-- into the new partition in the same transaction, so nothing is lost and the
-- default partition never blocks partition creation.
CREATE FUNCTION fraiseql_create_partition(parent regclass, target timestamptz,
                                          OUT partition_name text,
                                          OUT created boolean,
                                          OUT moved_rows bigint)
LANGUAGE plpgsql
SET TimeZone = 'UTC'
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cfg      @extschema@.tb_partition_config := @extschema@._fraiseql_partition_config(parent);
    unit     interval := ('1 ' || cfg.granularity)::interval;
    lo       timestamptz := date_trunc(cfg.granularity, target);
    hi       timestamptz := lo + unit;
    nsp      text;
    base     text;
    key      text := @extschema@._fraiseql_partition_key(parent);
    dflt     regclass := @extschema@._fraiseql_default_partition(parent);
    has_rows boolean := false;
    ix_name  text;  -- (a free name, when the usual one is taken)
BEGIN
    IF target IS NULL THEN
        RAISE EXCEPTION 'fraiseql_obs: target date must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    moved_rows := 0;
    created := false;

    SELECT v.partition_name INTO partition_name
      FROM @extschema@.v_partitions v
     WHERE v.parent_table = parent AND v.lower_bound = lo;
    IF FOUND THEN
        RETURN;
    END IF;

    SELECT n.nspname, c.relname INTO nsp, base
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = parent;
    partition_name := base || '_' || to_char(lo, CASE cfg.granularity WHEN 'month' THEN 'YYYY_MM' ELSE 'YYYY_MM_DD' END);

    -- A relation or type of that name that is not this partition (one made
    -- by hand, or by a role that may create objects in the schema to hold
    -- the month up; a table's name is also its row type's) does not stop
    -- it: the partition takes the next free name (partitions are known by
    -- their bounds, never by their names).
    IF to_regclass(format('%I.%I', nsp, partition_name)) IS NOT NULL
       OR to_regtype(format('%I.%I', nsp, partition_name)) IS NOT NULL THEN
        SELECT x.name INTO ix_name
          FROM generate_series(1, 100) g, LATERAL (SELECT partition_name || '_' || g AS name) x
         WHERE to_regclass(format('%I.%I', nsp, x.name)) IS NULL
           AND to_regtype(format('%I.%I', nsp, x.name)) IS NULL
         ORDER BY g LIMIT 1;
        IF ix_name IS NULL THEN
            RAISE EXCEPTION 'fraiseql_obs: cannot create partition %.% (for %): that name and %_1 to %_100 are taken by other relations or types',
                nsp, partition_name, lo, partition_name, partition_name
                USING ERRCODE = 'duplicate_table',
                      HINT = 'Rename or drop those relations.';
        END IF;
        partition_name := ix_name;
    END IF;

    IF dflt IS NOT NULL THEN
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s WHERE %I >= $1 AND %I < $2)', dflt, key, key)
           INTO has_rows USING lo, hi;
    END IF;

    -- Made apart, filled (rows of its range waiting in the default
    -- partition), indexed, then attached: ATTACH PARTITION takes only SHARE
    -- UPDATE EXCLUSIVE on the parent, so readers and writers go on (CREATE
    -- TABLE ... PARTITION OF would take ACCESS EXCLUSIVE).
    EXECUTE format('CREATE TABLE %I.%I (LIKE %s INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE)',
                   nsp, partition_name, parent);
    -- the range as a constraint, so that ATTACH need not scan the table
    EXECUTE format('ALTER TABLE %I.%I ADD CONSTRAINT %I CHECK (%I IS NOT NULL AND %I >= %L AND %I < %L)',
                   nsp, partition_name, partition_name || '_range', key, key, lo, key, hi);
    IF has_rows THEN
        EXECUTE format('WITH moved AS (DELETE FROM %s WHERE %I >= $1 AND %I < $2 RETURNING *) '
                       'INSERT INTO %I.%I SELECT * FROM moved', dflt, key, key, nsp, partition_name)
           USING lo, hi;
        GET DIAGNOSTICS moved_rows = ROW_COUNT;
    END IF;
    PERFORM @extschema@._fraiseql_index_partition(format('%I.%I', nsp, partition_name)::regclass, parent);
    EXECUTE format('ALTER TABLE %s ATTACH PARTITION %I.%I FOR VALUES FROM (%L) TO (%L)',
                   parent, nsp, partition_name, lo, hi);
    EXECUTE format('ALTER TABLE %I.%I DROP CONSTRAINT %I', nsp, partition_name, partition_name || '_range');
    created := true;
END
$$;

-- Makes on a partition the indexes its parent's partitions have
-- (tb_partition_index); those it has already are left as they are.
CREATE FUNCTION _fraiseql_index_partition(part regclass, parent regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ix   record;
    nsp  text;
    base text;
BEGIN
    SELECT n.nspname, c.relname INTO nsp, base
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = part;
    FOR ix IN SELECT * FROM @extschema@.tb_partition_index i WHERE i.parent_table = parent ORDER BY i.suffix LOOP
        -- Its index of that name, if it has one, is left as it is. A
        -- relation of that name that is not (made by a role that may create
        -- objects in the schema) does not stand in for it: the index is
        -- then made under a name PostgreSQL chooses (IF NOT EXISTS would
        -- have skipped it, and left the partition without the index).
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                               WHERE i.indrelid = part AND c.relname = left(base || '_' || ix.suffix, 63));
        IF to_regclass(format('%I.%I', nsp, left(base || '_' || ix.suffix, 63))) IS NULL THEN
            EXECUTE format('CREATE %s INDEX %I ON %s %s',
                           CASE WHEN ix.is_unique THEN 'UNIQUE' ELSE '' END,
                           left(base || '_' || ix.suffix, 63), part, ix.definition);
        ELSE
            EXECUTE format('CREATE %s INDEX ON %s %s',
                           CASE WHEN ix.is_unique THEN 'UNIQUE' ELSE '' END, part, ix.definition);
        END IF;
    END LOOP;
END
$$;

-- Make sure the partitions for the current unit and `ahead` units after it exist.
CREATE FUNCTION fraiseql_ensure_partitions(parent regclass, ahead integer)
RETURNS TABLE (partition_name text, created boolean)
LANGUAGE plpgsql
SET TimeZone = 'UTC'
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cfg  @extschema@.tb_partition_config := @extschema@._fraiseql_partition_config(parent);
    unit interval := ('1 ' || cfg.granularity)::interval;
    r    record;
BEGIN
    IF ahead IS NULL OR ahead < 0 THEN
        RAISE EXCEPTION 'fraiseql_obs: the number of partitions to create ahead must be >= 0, got %', ahead
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR i IN 0..ahead LOOP
        r := @extschema@.fraiseql_create_partition(parent, date_trunc(cfg.granularity, now()) + i * unit);
        partition_name := r.partition_name;
        created := r.created;
        RETURN NEXT;
    END LOOP;
END
$$;

-- Drop the partitions of `parent` that end at or before the start of the
-- current unit minus `keep` units. keep = 0 keeps everything. The partition
-- holding now() is never dropped.
CREATE FUNCTION fraiseql_drop_old_partitions(parent regclass, keep integer)
RETURNS TABLE (partition_name text, dropped boolean)
LANGUAGE plpgsql
SET TimeZone = 'UTC'
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cfg    @extschema@.tb_partition_config := @extschema@._fraiseql_partition_config(parent);
    unit   interval := ('1 ' || cfg.granularity)::interval;
    cutoff timestamptz;
    r      record;
    q      text;
BEGIN
    IF keep IS NULL OR keep < 0 THEN
        RAISE EXCEPTION 'fraiseql_obs: retention must be >= 0 (0 keeps data forever), got %', keep
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF keep = 0 THEN
        RETURN;
    END IF;
    -- one dropper at a time: a manual call and the worker's maintenance run
    -- would otherwise both try to drop the same partition (the lock is the
    -- maintenance run's own, which it already holds)
    PERFORM FROM @extschema@.tb_maintenance_lock FOR UPDATE;
    cutoff := date_trunc(cfg.granularity, now()) - keep * unit;
    FOR r IN
        SELECT v.partition, v.partition_name, v.lower_bound, v.upper_bound
          FROM @extschema@.v_partitions v
         WHERE v.parent_table = parent
           AND NOT v.is_default
           AND v.upper_bound <= cutoff
           AND NOT (now() >= v.lower_bound AND now() < v.upper_bound)
         ORDER BY v.lower_bound
    LOOP
        IF parent = '@extschema@.tb_error_occurrence'::regclass THEN
            -- The group counts give back the rows dropped (tombstones: a
            -- row a fold may be counting right now keeps its transaction's
            -- id, and the next fold decides). No row may come in before the
            -- drop: EXCLUSIVE stops writers, not readers, so a fold reading
            -- the table is never caught between this lock and the parent's,
            -- which DROP takes next (ACCESS EXCLUSIVE here made a deadlock
            -- with a fold: it locks parent, then partitions). Its rollup
            -- buckets go with it (the range holds all and only its rows;
            -- the buckets are aligned on its UTC bounds), so no roll-up may
            -- run meanwhile: its lock is taken first. So is the fold's: a
            -- fold writes every partition through the parent (parent, then
            -- partitions), so one started now would hold the parent and
            -- wait for this partition while DROP waits for the parent (a
            -- deadlock make bench found); a fold that finds its lock taken
            -- skips its turn instead of waiting.
            LOCK TABLE @extschema@.tb_rollup_state IN SHARE ROW EXCLUSIVE MODE;
            LOCK TABLE @extschema@.tb_error_fold_state IN SHARE ROW EXCLUSIVE MODE;
            EXECUTE format('LOCK TABLE %s IN EXCLUSIVE MODE', r.partition);
            FOR q IN SELECT @extschema@._fraiseql_bury_statements(format('SELECT * FROM %s', r.partition), false) LOOP
                EXECUTE q;
            END LOOP;
            DELETE FROM @extschema@.tb_rollup_error_minute m WHERE m.bucket >= r.lower_bound AND m.bucket < r.upper_bound;
            DELETE FROM @extschema@.tb_rollup_error_5min m WHERE m.bucket >= r.lower_bound AND m.bucket < r.upper_bound;
            DELETE FROM @extschema@.tb_rollup_error_hour m WHERE m.bucket >= r.lower_bound AND m.bucket < r.upper_bound;
            DELETE FROM @extschema@.tb_rollup_error_day m WHERE m.bucket >= r.lower_bound AND m.bucket < r.upper_bound;
        END IF;
        -- (accounted for above: not a drop by hand, see _fraiseql_table_dropped)
        PERFORM set_config('fraiseql_obs_internal.accounted_drop', r.partition_name, true);
        EXECUTE format('DROP TABLE %s', r.partition);
        PERFORM set_config('fraiseql_obs_internal.accounted_drop', '', true);
        partition_name := r.partition_name;
        dropped := true;
        RETURN NEXT;
    END LOOP;
END
$$;

-- Move every row of the default partition into its proper partition
-- (creating it). Returns the number of rows moved.
CREATE FUNCTION fraiseql_move_default_rows(parent regclass) RETURNS bigint
LANGUAGE plpgsql
SET TimeZone = 'UTC'
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cfg   @extschema@.tb_partition_config := @extschema@._fraiseql_partition_config(parent);
    dflt  regclass := @extschema@._fraiseql_default_partition(parent);
    key   text := @extschema@._fraiseql_partition_key(parent);
    unit_start timestamptz;
    q     text;
    v_old boolean;
    total bigint := 0;
    v_unit interval := ('1 ' || cfg.granularity)::interval;
    v_keep integer := @extschema@.fraiseql_setting(cfg.retention_guc)::integer;
    v_ahead integer := @extschema@.fraiseql_setting(CASE cfg.granularity WHEN 'month' THEN 'fraiseql_obs.premake_months'
                                                     ELSE 'fraiseql_obs.premake_days' END)::integer;
    v_lo timestamptz := CASE WHEN v_keep > 0 THEN date_trunc(cfg.granularity, now()) - v_keep * v_unit
                             ELSE '1970-01-01'::timestamptz END;
    v_hi timestamptz := date_trunc(cfg.granularity, now()) + (v_ahead + 1) * v_unit;
BEGIN
    IF dflt IS NULL THEN
        RETURN 0;
    END IF;
    -- Only rows whose partition belongs to the kept window move: older rows
    -- are past retention (deleted, as their partition would be), rows beyond
    -- the partitions made ahead wait in the default partition until their
    -- time comes, and non-finite times stay there (they have no partition).
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s WHERE %I < $1)', dflt, key) INTO v_old USING v_lo;
    IF v_old AND parent = '@extschema@.tb_error_occurrence'::regclass THEN
        -- the counts give them back (a DELETE on the partition itself is
        -- not seen by the parent's trigger); no capture may add one between
        -- the tombstones and the delete
        EXECUTE format('LOCK TABLE %s IN EXCLUSIVE MODE', dflt);
        FOR q IN SELECT @extschema@._fraiseql_bury_statements(
                            format('SELECT * FROM %s WHERE occurred_at < %L', dflt, v_lo)) LOOP
            EXECUTE q;
        END LOOP;
    END IF;
    EXECUTE format('DELETE FROM %s WHERE %I < $1', dflt, key) USING v_lo;
    FOR unit_start IN
        EXECUTE format('SELECT DISTINCT date_trunc(%L, %I) FROM %s WHERE %I >= $1 AND %I < $2',
                       cfg.granularity, key, dflt, key, key) USING v_lo, v_hi
    LOOP
        total := total + (@extschema@.fraiseql_create_partition(parent, unit_start)).moved_rows;
    END LOOP;
    RETURN total;
END
$$;

-- ---------------------------------------------------------------------------
-- The seed's functions, by their seed names and signatures.
-- ---------------------------------------------------------------------------
CREATE FUNCTION create_error_occurrence_partition(target_date date) RETURNS text
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (@extschema@.fraiseql_create_partition('@extschema@.tb_error_occurrence'::regclass,
                                      (target_date::text || ' 00:00:00+00')::timestamptz)).partition_name
$$;

CREATE FUNCTION create_notification_log_partition(target_date date) RETURNS text
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (@extschema@.fraiseql_create_partition('@extschema@.tb_error_notification_log'::regclass,
                                      (target_date::text || ' 00:00:00+00')::timestamptz)).partition_name
$$;

CREATE FUNCTION ensure_error_occurrence_partitions(months_ahead integer)
RETURNS TABLE (partition_name text, created boolean)
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM @extschema@.fraiseql_ensure_partitions('@extschema@.tb_error_occurrence'::regclass, months_ahead)
$$;

CREATE FUNCTION ensure_notification_log_partitions(months_ahead integer)
RETURNS TABLE (partition_name text, created boolean)
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM @extschema@.fraiseql_ensure_partitions('@extschema@.tb_error_notification_log'::regclass, months_ahead)
$$;

CREATE FUNCTION drop_old_error_occurrence_partitions(retention_months integer)
RETURNS TABLE (partition_name text, dropped boolean)
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM @extschema@.fraiseql_drop_old_partitions('@extschema@.tb_error_occurrence'::regclass, retention_months)
$$;

CREATE FUNCTION drop_old_notification_log_partitions(retention_months integer)
RETURNS TABLE (partition_name text, dropped boolean)
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM @extschema@.fraiseql_drop_old_partitions('@extschema@.tb_error_notification_log'::regclass, retention_months)
$$;

-- Storage statistics with exact row counts (count(*) per partition: exact, and
-- proportional to the table's size; use pg_class.reltuples for an estimate).
CREATE FUNCTION get_partition_stats()
RETURNS TABLE (table_name text, partition_name text, row_count bigint, total_size text, index_size text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT v.parent_table, v.partition, v.partition_name
          FROM @extschema@.v_partitions v
         ORDER BY v.parent_table::text, v.is_default, v.lower_bound
    LOOP
        table_name := (SELECT c.relname::text FROM pg_class c WHERE c.oid = r.parent_table);
        partition_name := r.partition_name;
        EXECUTE format('SELECT count(*) FROM %s', r.partition) INTO row_count;
        total_size := pg_size_pretty(pg_total_relation_size(r.partition));
        index_size := pg_size_pretty(pg_indexes_size(r.partition));
        RETURN NEXT;
    END LOOP;
END
$$;

-- A partition of the occurrences dropped by hand: the fold and the rollups
-- are asked to recount from the rows that remain (tb_recount_request). An
-- event trigger runs for every DROP TABLE in the database, so it does
-- nothing else, and it never makes the DROP fail. It runs as the role that
-- drops: only a role that may write the extension's tables (the one that
-- can drop its partitions) asks for a recount, not one dropping a table of
-- its own that looks like a partition.
CREATE FUNCTION _fraiseql_table_dropped() RETURNS event_trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_name text;
BEGIN
    IF NOT has_table_privilege('@extschema@.tb_recount_request', 'INSERT') THEN
        RETURN;
    END IF;
    SELECT d.object_name INTO v_name
      FROM pg_event_trigger_dropped_objects() d
     WHERE d.object_type = 'table' AND d.schema_name = '@extschema@'
       AND d.object_name ~ '^tb_error_occurrence_[0-9]{4}_[0-9]{2}$'
       AND d.object_name IS DISTINCT FROM nullif(current_setting('fraiseql_obs_internal.accounted_drop', true), '')
     LIMIT 1;
    IF v_name IS NOT NULL THEN
        INSERT INTO @extschema@.tb_recount_request (consumer, partition)
        VALUES ('groups', v_name), ('rollups', v_name);
    END IF;
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'fraiseql_obs: could not record the drop of an occurrence partition (counts are recounted at the next drop): %', SQLERRM;
END
$$;

CREATE EVENT TRIGGER fraiseql_obs_table_dropped ON sql_drop
    WHEN TAG IN ('DROP TABLE')
    EXECUTE FUNCTION _fraiseql_table_dropped();

-- The same by hand, after what the extension cannot see (DETACH PARTITION,
-- DELETE or TRUNCATE on a partition itself): the next fold and roll-up
-- recount from the rows there are. Owner only (a full pass over the rows).
CREATE FUNCTION fraiseql_recount() RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO @extschema@.tb_recount_request (consumer, partition)
    VALUES ('groups', '(fraiseql_recount)'), ('rollups', '(fraiseql_recount)');
$$;
