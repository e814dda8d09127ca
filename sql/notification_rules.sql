-- fraiseql_obs: notification rules, queue and delivery bookkeeping.
-- Delivery itself (SMTP, HTTP) is done by the background worker (src/notify).

-- ---------------------------------------------------------------------------
-- Channels: the built-in ones and those registered with
-- fraiseql_register_channel(). default_config is merged under each rule's
-- channel_config (typically the SMTP server, or a team's Slack webhook).
-- Secrets live here and in the rules: neither table is readable by PUBLIC.
-- ---------------------------------------------------------------------------
CREATE TABLE tb_notification_channel (
    channel_type   text PRIMARY KEY CHECK (channel_type ~ '^[a-z][a-z0-9_]*$'),
    -- the handler's signature, schema-qualified ('public.f(jsonb,jsonb)'):
    -- text, not regprocedure, which stores an oid and which pg_upgrade
    -- refuses in a table for that reason; resolved at each call
    handler        text,
    default_config jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(default_config) = 'object'),
    created_at     timestamptz NOT NULL DEFAULT now(),
    -- the role a channel belongs to: the one that registered it (the
    -- installer for the built-in ones); only it, its members or a superuser
    -- may change it or remove it (see _fraiseql_channel_check). A name, not
    -- an oid: it survives a dump and restore.
    registered_by  text
);
-- (the built-in channels: _fraiseql_install_rows, finalize.sql)

-- Registers a custom channel: handler(error jsonb, config jsonb) returning
-- (success boolean, error_message text) — a composite, a record with those
-- OUT parameters, or a table of one row. The worker calls it for each delivery.
CREATE FUNCTION fraiseql_register_channel(channel_type text, handler regprocedure, default_config jsonb DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_args oidvector;
BEGIN
    IF $1 IN ('email', 'slack', 'webhook', 'pg_notify') THEN
        RAISE EXCEPTION 'fraiseql_obs: % is a built-in channel', $1 USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT proargtypes INTO v_args FROM pg_proc WHERE oid = $2;
    IF v_args IS NULL OR array_length(v_args::oid[], 1) IS DISTINCT FROM 2
       OR v_args[0] <> 'jsonb'::regtype OR v_args[1] <> 'jsonb'::regtype THEN
        RAISE EXCEPTION 'fraiseql_obs: a channel handler takes (error jsonb, config jsonb), % does not', $2
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO @extschema@.tb_notification_channel AS c (channel_type, handler, default_config)
    VALUES ($1, $2::text, coalesce($3, '{}'))
    ON CONFLICT ON CONSTRAINT tb_notification_channel_pkey
        DO UPDATE SET handler = excluded.handler, default_config = excluded.default_config;
END
$$;

-- A handler runs as the owner of its function (src/notify/custom.rs), so
-- registering one that another role owns would let that role's code run on
-- every delivery under a name the registrar chose: only the function's owner
-- (or a member of the owning role) or a superuser may point a channel at it.
-- A channel belongs to the role that registered it: registering needs
-- UPDATE on the table (re-registering is an upsert), and that right alone
-- must not let one team point another team's channel, or the built-in
-- webhook's default URL, at its own function or server (it would receive
-- their payloads and their rules' secrets). Checked on the table itself,
-- so a direct INSERT, UPDATE or DELETE is held to it too. (A superuser may
-- hand a channel to a role: UPDATE ... SET registered_by.)
CREATE FUNCTION _fraiseql_channel_check() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_owner oid;
    v_proc  regprocedure;
    v_super boolean := coalesce((SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = current_user), false);
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') AND NOT v_super
       AND NOT (EXISTS (SELECT FROM pg_roles r WHERE r.rolname = OLD.registered_by)
                AND pg_has_role(current_user, OLD.registered_by, 'USAGE')) THEN
        RAISE EXCEPTION 'fraiseql_obs: channel "%" belongs to role %', OLD.channel_type, coalesce(OLD.registered_by, '(none)')
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Only that role (or a member of it), or a superuser, may change or remove it.';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    IF TG_OP = 'INSERT' THEN
        -- (a superuser's row keeps the role it names: a restore's)
        IF NOT v_super OR NEW.registered_by IS NULL THEN
            NEW.registered_by := current_user;
        END IF;
    ELSIF NOT v_super THEN
        NEW.registered_by := OLD.registered_by;
    END IF;
    IF NEW.handler IS NULL OR (TG_OP = 'UPDATE' AND NEW.handler IS NOT DISTINCT FROM OLD.handler) THEN
        RETURN NEW;
    END IF;
    -- resolved with search_path = pg_catalog: a name must say its schema
    v_proc := NEW.handler::regprocedure;
    NEW.handler := v_proc::text;
    SELECT p.proowner INTO v_owner FROM pg_proc p WHERE p.oid = v_proc;
    IF NOT (SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = current_user)
       AND NOT pg_has_role(current_user, v_owner, 'USAGE') THEN
        RAISE EXCEPTION 'fraiseql_obs: must own function % to register it as a channel handler', NEW.handler
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'A handler runs as the owner of its function; ask that role (or a superuser) to register it.';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER notification_channel_check
    BEFORE INSERT OR UPDATE OR DELETE ON tb_notification_channel
    FOR EACH ROW EXECUTE FUNCTION _fraiseql_channel_check();

-- TRUNCATE fires no row trigger: it would remove every team's channels at
-- once (to register their names again with other handlers).
CREATE FUNCTION _fraiseql_channel_truncate() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT coalesce((SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = current_user), false) THEN
        RAISE EXCEPTION 'fraiseql_obs: only a superuser may truncate the channels (each belongs to its role)'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER notification_channel_truncate
    BEFORE TRUNCATE ON tb_notification_channel
    FOR EACH STATEMENT EXECUTE FUNCTION _fraiseql_channel_truncate();

-- Defaults of a built-in channel (SMTP server, a default Slack webhook, ...).
CREATE FUNCTION fraiseql_set_channel_defaults(channel_type text, default_config jsonb) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF jsonb_typeof($2) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'fraiseql_obs: default_config must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE @extschema@.tb_notification_channel c SET default_config = $2 WHERE c.channel_type = $1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'fraiseql_obs: unknown channel type "%"', $1 USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

-- ---------------------------------------------------------------------------
-- Rule validation. The seed's examples insert rules without a channel_type
-- when the config says which channel it is ('{"webhook_url": ...}' is Slack's
-- incoming webhook): it is inferred. Bad rows are refused with a clear error.
-- ---------------------------------------------------------------------------
-- A rule's configuration over its channel's defaults. The defaults'
-- credentials (an SMTP login, a webhook's headers) go only where the
-- defaults send: a rule that names another destination or weakens how it
-- is reached (host, port, url, TLS) gets none of them, or a role allowed
-- to write rules could have the team's SMTP password or API token sent to
-- a server of its own.
CREATE FUNCTION _fraiseql_channel_config(p_defaults jsonb, p_rule jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN EXISTS (
                    SELECT 1 FROM unnest(ARRAY['smtp_host', 'smtp_port', 'tls', 'use_tls', 'allow_plaintext_login',
                                               'tls_ca_pem', 'tls_ca_file', 'url', 'webhook_url',
                                               -- (nor to send as another sender through the team's login)
                                               'from', 'from_address']) k
                     WHERE r ? k AND r->k IS DISTINCT FROM d->k)
                THEN (d - ARRAY['smtp_user', 'smtp_password', 'headers']) || r
                ELSE d || r END
      FROM (SELECT coalesce(p_defaults, '{}') AS d, coalesce(p_rule, '{}') AS r) x
$$;

CREATE FUNCTION _fraiseql_notification_config_check() RETURNS trigger
LANGUAGE plpgsql
-- (as the owner: a rule writer has INSERT on the rules, no right on the
-- channels or the restore state this reads; it runs no code of the writer's)
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_channel @extschema@.tb_notification_channel;
    v_config  jsonb;
    v_missing text;
BEGIN
    -- the worker's bookkeeping (last_triggered) changes nothing checked
    IF TG_OP = 'UPDATE' AND to_jsonb(NEW) - 'last_triggered' = to_jsonb(OLD) - 'last_triggered' THEN
        RETURN NEW;
    END IF;
    -- rows a dump brings were checked when they were written; their channel
    -- may come later in the restore (tb_restore_session). Only a
    -- superuser's session restores (the extension needs one): a rule
    -- writer's insert meanwhile is checked like any other. (This function
    -- runs as its owner: the session's login role is the caller's.)
    IF TG_OP = 'INSERT' AND EXISTS (SELECT FROM @extschema@.tb_restore_session)
       AND coalesce((SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = session_user), false) THEN
        RETURN NEW;
    END IF;
    IF NEW.channel_config IS NULL THEN
        NEW.channel_config := '{}'::jsonb;
    END IF;
    IF jsonb_typeof(NEW.channel_config) <> 'object' THEN
        RAISE EXCEPTION 'fraiseql_obs: channel_config must be a JSON object, got %', jsonb_typeof(NEW.channel_config)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NEW.channel_type IS NULL THEN
        NEW.channel_type := CASE
            WHEN NEW.channel_config ? 'webhook_url' THEN 'slack'
            WHEN NEW.channel_config ? 'url' THEN 'webhook'
            WHEN NEW.channel_config ? 'to' THEN 'email'
        END;
        IF NEW.channel_type IS NULL THEN
            RAISE EXCEPTION 'fraiseql_obs: channel_type is missing and cannot be inferred from channel_config'
                USING ERRCODE = 'not_null_violation',
                      HINT = 'Set channel_type to email, slack, webhook, pg_notify or a registered channel.';
        END IF;
    END IF;
    SELECT * INTO v_channel FROM @extschema@.tb_notification_channel c WHERE c.channel_type = NEW.channel_type;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'fraiseql_obs: unknown channel type "%"', NEW.channel_type
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Built-in: email, slack, webhook, pg_notify; others need fraiseql_register_channel().';
    END IF;
    v_config := @extschema@._fraiseql_channel_config(v_channel.default_config, NEW.channel_config);
    v_missing := CASE NEW.channel_type
        WHEN 'email' THEN CASE WHEN NOT (v_config ? 'to') THEN 'to (the recipients)' END
        WHEN 'slack' THEN CASE WHEN NOT (v_config ? 'webhook_url') THEN 'webhook_url' END
        WHEN 'webhook' THEN CASE WHEN NOT (v_config ? 'url') THEN 'url' END
    END;
    IF v_missing IS NOT NULL THEN
        RAISE EXCEPTION 'fraiseql_obs: a % rule needs % in channel_config (or in the channel''s defaults)',
            NEW.channel_type, v_missing
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'See fraiseql_set_channel_defaults().';
    END IF;
    IF NEW.channel_type = 'webhook' AND upper(coalesce(v_config->>'method', 'POST')) NOT IN ('POST', 'PUT', 'PATCH') THEN
        RAISE EXCEPTION 'fraiseql_obs: webhook method must be POST, PUT or PATCH' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NEW.channel_type IN ('slack', 'webhook') AND coalesce(v_config->>CASE NEW.channel_type WHEN 'slack' THEN 'webhook_url' ELSE 'url' END, '')
       !~ '^https?://[^/?#]+' THEN
        RAISE EXCEPTION 'fraiseql_obs: the % url must start with http:// or https://', NEW.channel_type
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- no file system access from a rule: a CA is inline PEM, or a file name
    -- inside the directory a superuser set (fraiseql_obs.tls_ca_directory)
    IF v_config ? 'tls_ca_file' AND (v_config->>'tls_ca_file' ~ '[/\\]|^\.' OR v_config->>'tls_ca_file' = '') THEN
        RAISE EXCEPTION 'fraiseql_obs: tls_ca_file must be a file name within fraiseql_obs.tls_ca_directory, not a path'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Give the CA inline as tls_ca_pem instead.';
    END IF;
    IF octet_length(v_config->>'tls_ca_pem') > 65536 THEN
        RAISE EXCEPTION 'fraiseql_obs: tls_ca_pem is larger than 64 KiB' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(v_config->'headers') = 'object' AND EXISTS (
           SELECT 1 FROM jsonb_object_keys(v_config->'headers') h
            WHERE lower(btrim(h)) IN ('host', 'content-length', 'transfer-encoding', 'connection', 'upgrade',
                                      'expect', 'te', 'trailer', 'keep-alive', 'proxy-authorization',
                                      'proxy-connection', 'x-fraiseql-delivery-id')) THEN
        RAISE EXCEPTION 'fraiseql_obs: a webhook rule may not set the Host, Content-Length, Transfer-Encoding, Connection, Upgrade, Expect, TE, Trailer, Keep-Alive, Proxy-Authorization, Proxy-Connection or X-Fraiseql-Delivery-Id header'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NEW.notify_on_occurrence IS NOT NULL AND (cardinality(NEW.notify_on_occurrence) NOT BETWEEN 1 AND 100
       OR EXISTS (SELECT 1 FROM unnest(NEW.notify_on_occurrence) m WHERE m IS NULL OR m < 1)) THEN
        RAISE EXCEPTION 'fraiseql_obs: notify_on_occurrence must list 1 to 100 counts, each >= 1' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NEW.digest AND NEW.rate_limit_minutes = 0 THEN
        RAISE EXCEPTION 'fraiseql_obs: a digest rule needs rate_limit_minutes > 0 (its window)' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF (NEW.frequency_threshold IS NOT NULL OR NEW.users_threshold IS NOT NULL) <> (NEW.frequency_window IS NOT NULL) THEN
        RAISE EXCEPTION 'fraiseql_obs: frequency_threshold and users_threshold need frequency_window, and frequency_window needs one of them'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'frequency_threshold => 100, frequency_window => ''1 hour'' fires when more than 100 occur within an hour.';
    END IF;
    IF NEW.frequency_window <= interval '0' OR NEW.frequency_window > interval '30 days' THEN
        RAISE EXCEPTION 'fraiseql_obs: frequency_window must be positive and at most 30 days' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NEW.frequency_window IS NOT NULL AND NEW.notify_on_occurrence IS NOT NULL THEN
        RAISE EXCEPTION 'fraiseql_obs: a rule is either a milestone rule (notify_on_occurrence) or a frequency rule, not both'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- a condition is tested on every occurrence the rule looks at: shapes
    -- whose cost grows as a power of the payload are refused
    v_missing := @extschema@._fraiseql_condition_problem(NEW.condition::text);
    IF v_missing IS NOT NULL THEN
        RAISE EXCEPTION 'fraiseql_obs: condition refused: %', v_missing
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Conditions test the error''s payload, e.g. $.context.user_id == "vip" or exists($.context.items[*] ? (@.price > 100)).';
    END IF;
    IF NEW.severity = '{}' THEN NEW.severity := NULL; END IF;
    IF NEW.environment = '{}' THEN NEW.environment := NULL; END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER notification_config_check
    BEFORE INSERT OR UPDATE ON tb_error_notification_config
    FOR EACH ROW EXECUTE FUNCTION _fraiseql_notification_config_check();

-- captures know whether rules exist (to wake the worker at commit): this
-- session reads it again at once, others within a second
CREATE FUNCTION _fraiseql_rules_changed_trigger() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER  -- (a rule writer may not call what it calls)
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM @extschema@._fraiseql_rules_changed();
    RETURN NULL;
END
$$;

CREATE TRIGGER notification_config_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON tb_error_notification_config
    FOR EACH STATEMENT EXECUTE FUNCTION _fraiseql_rules_changed_trigger();

-- Rules as anyone allowed to read them may see them: secrets redacted at
-- any depth (nested objects and arrays), for every common secret name.
CREATE FUNCTION _fraiseql_redact(v jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE jsonb_typeof(v)
        WHEN 'object' THEN coalesce((
            SELECT jsonb_object_agg(k, CASE
                       WHEN k ~* '(pass|secret|token|auth|cred|key|sid|cookie|session|signature|private|bearer|webhook_url|^url$|_url$|dsn|headers|smtp_user|login|certificate|pem)'
                       THEN '"[redacted]"'::jsonb
                       ELSE @extschema@._fraiseql_redact(e.val) END)
              FROM jsonb_each(v) AS e(k, val)), '{}'::jsonb)
        WHEN 'array' THEN (SELECT coalesce(jsonb_agg(@extschema@._fraiseql_redact(x) ORDER BY i), '[]'::jsonb)
                             FROM jsonb_array_elements(v) WITH ORDINALITY AS a(x, i))
        ELSE v END
$$;

-- Rules that failed or ran past the fold's time for rules, suspended for a
-- while: a minute after the first strike, doubling up to an hour, so that a
-- costly rule does not take every fold's time again (its notifications are
-- lost meanwhile, which the log says). A change to its condition ends it.
CREATE TABLE tb_notification_rule_strike (
    -- (no foreign key: striking a rule must never wait for its writer's lock)
    config_id       uuid PRIMARY KEY,
    strikes         integer NOT NULL,
    suspended_until timestamptz NOT NULL,
    last_problem    text
);

CREATE VIEW v_notification_rules AS
SELECT c.config_id, error_fingerprint, error_type, severity, environment, channel_type,
       @extschema@._fraiseql_redact(channel_config) AS channel_config,
       rate_limit_minutes, min_occurrence_count, notify_on_new, notify_on_regression,
       notify_on_occurrence, condition, digest, enabled, created_at, last_triggered,
       frequency_threshold, users_threshold, frequency_window, notify_on_escalation, skip_if_assigned,
       -- (a rule that failed or ran too long in a fold: tb_notification_rule_strike)
       k.suspended_until, k.last_problem AS suspension_reason
  FROM tb_error_notification_config c
  LEFT JOIN tb_notification_rule_strike k ON k.config_id = c.config_id AND k.suspended_until > now();

-- ---------------------------------------------------------------------------
-- The delivery queue. Capture inserts into it in its own transaction (a
-- rolled-back capture notifies nobody; a committed one is never lost); the
-- worker delivers, at least once, with a stable delivery_id.
-- ---------------------------------------------------------------------------
CREATE TABLE tb_notification_queue (
    delivery_id     uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    config_id       uuid NOT NULL,
    error_id        uuid NOT NULL,
    reason          text NOT NULL,
    payload         jsonb NOT NULL,
    attempt         integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    locked_until    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_error      text
);
CREATE INDEX idx_notification_queue_due ON tb_notification_queue (next_attempt_at);
-- (the claim looks for leases that ran out at every batch)
CREATE INDEX idx_notification_queue_leased ON tb_notification_queue (locked_until) WHERE locked_until IS NOT NULL;

-- Rate limiting: when each rule last notified about each group.
CREATE TABLE tb_notification_state (
    config_id        uuid NOT NULL,
    error_id         uuid NOT NULL,
    last_enqueued_at timestamptz NOT NULL,
    -- of a milestone rule: the highest milestone announced (a count that
    -- fell, by deletes or an unmerge, and rises again announces none twice)
    milestone        bigint,
    PRIMARY KEY (config_id, error_id)
) WITH (fillfactor = 70);

-- Frequency rules (frequency_threshold, users_threshold): until when the
-- group's window stays over the rule's threshold with the occurrences known
-- at the last look. A batch whose first occurrence comes after that time
-- found the window fallen back below: a new crossing. (Kept a window's
-- length at least past that time: a late row of the episode finds it.)
CREATE TABLE tb_notification_crossing (
    config_id  uuid NOT NULL,
    error_id   uuid NOT NULL,
    over_until timestamptz NOT NULL,
    PRIMARY KEY (config_id, error_id)
);

-- Digest rules collect matching groups over their window.
CREATE TABLE tb_notification_digest (
    config_id    uuid NOT NULL,
    error_id     uuid NOT NULL,
    window_start timestamptz NOT NULL,
    PRIMARY KEY (config_id, error_id)
);

-- The error as notifications describe it (the seed's webhook payload), from
-- its group row. A bare expression, inlined by the planner (see
-- _fraiseql_occurrence_payload).
CREATE FUNCTION _fraiseql_group_payload(g tb_error_log) RETURNS jsonb
LANGUAGE sql STABLE
AS $$
    SELECT pg_catalog.jsonb_build_object(
        'error_id', g.error_id, 'error_fingerprint', g.error_fingerprint, 'error_type', g.error_type,
        'error_message', g.error_message, 'severity', g.severity,
        'occurrence_count', g.occurrence_count, 'first_seen', g.first_seen, 'last_seen', g.last_seen,
        'environment', g.environment, 'release_version', g.release_version,
        'stack_trace', pg_catalog.left(g.stack_trace, 16384),
        'title', g.title, 'culprit', g.culprit, 'status', g.status,
        'context', NULL, 'trace_id', NULL)
$$;

-- Whether a rule's filters (NULL matches anything) admit an error.
CREATE FUNCTION _fraiseql_rule_admits(r tb_error_notification_config, p_fingerprint text, p_type text,
                                      p_severity text, p_environment text) RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
    SELECT (p_fingerprint IS NULL OR r.error_fingerprint IS NULL OR r.error_fingerprint = p_fingerprint)
       AND (r.error_type IS NULL OR r.error_type = p_type)
       AND (r.severity IS NULL OR p_severity = ANY (r.severity))
       AND (r.environment IS NULL OR p_environment = ANY (r.environment))
$$;

-- A frequency rule (frequency_threshold and/or users_threshold within
-- frequency_window) on a group whose occurrences a fold counted, the first
-- of them at p_first: whether this is a crossing. The window ending now is
-- over the threshold when more than N of the group's occurrences (those
-- the rule's environment, type and severity filters admit) and more than N
-- distinct users (tb_error_user, of any of them) fall in it; it stays so until the (N+1)-th latest leaves it. Over now, and not
-- over just before p_first by what was known at the last look
-- (tb_notification_crossing): a crossing, once, whatever the rate limit
-- makes of it. Each read stops after N + 1 rows of each of the group's
-- error_ids.
CREATE FUNCTION _fraiseql_frequency_crossed(r tb_error_notification_config, p_error_id uuid, p_first timestamptz)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_ids   uuid[] := @extschema@.fraiseql_error_group_ids(p_error_id);
    -- (the clock, not the transaction's start: rows committed since count)
    v_from  timestamptz := clock_timestamp() - r.frequency_window;
    v_until timestamptz := 'infinity';
    v_t     timestamptz;
    v_was   timestamptz;
BEGIN
    IF r.frequency_threshold IS NOT NULL THEN
        SELECT x.occurred_at INTO v_t
          FROM unnest(v_ids) AS i(id)
         CROSS JOIN LATERAL (SELECT o.occurred_at FROM @extschema@.tb_error_occurrence o
                              WHERE o.error_id = i.id AND o.occurred_at > v_from
                                -- (a row dated ahead counts when its time comes)
                                AND o.occurred_at <= clock_timestamp() + interval '1 minute'
                                -- the occurrences the rule is about
                                AND (r.environment IS NULL OR o.environment = ANY (r.environment))
                                AND (r.error_type IS NULL OR o.error_type = r.error_type)
                                AND (r.severity IS NULL OR o.severity = ANY (r.severity))
                              ORDER BY o.occurred_at DESC
                              LIMIT r.frequency_threshold::bigint + 1) x
         ORDER BY x.occurred_at DESC
        OFFSET r.frequency_threshold LIMIT 1;
        v_until := CASE WHEN v_t IS NOT NULL THEN least(v_until, v_t + r.frequency_window) END;  -- (NULL: not over)
    END IF;
    IF r.users_threshold IS NOT NULL AND v_until IS NOT NULL THEN
        SELECT max(x.last_seen) INTO v_t
          FROM unnest(v_ids) AS i(id)
         CROSS JOIN LATERAL (SELECT u.user_key, u.last_seen FROM @extschema@.tb_error_user u
                              WHERE u.error_id = i.id AND u.last_seen > v_from
                              ORDER BY u.last_seen DESC
                              LIMIT r.users_threshold::bigint + 1) x
         GROUP BY x.user_key
         ORDER BY max(x.last_seen) DESC
        OFFSET r.users_threshold LIMIT 1;
        v_until := CASE WHEN v_t IS NOT NULL THEN least(v_until, v_t + r.frequency_window) END;
    END IF;
    SELECT c.over_until INTO v_was FROM @extschema@.tb_notification_crossing c
     WHERE c.config_id = r.config_id AND c.error_id = p_error_id;
    IF v_until IS NULL THEN
        -- (the state stays: a late row of the same episode must find it)
        RETURN false;
    END IF;
    INSERT INTO @extschema@.tb_notification_crossing AS c (config_id, error_id, over_until)
    VALUES (r.config_id, p_error_id, v_until)
    ON CONFLICT (config_id, error_id) DO UPDATE SET over_until = excluded.over_until
     WHERE c.over_until IS DISTINCT FROM excluded.over_until;
    RETURN v_was IS NULL OR v_was < p_first;
END
$$;

-- Whether a rule is evaluated by folds now: not suspended, and with a
-- condition the write-time check admits (a rule restored from an older
-- dump, or written while that check could be skipped, is held to it too).
CREATE FUNCTION _fraiseql_rule_live(p_config uuid) RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT NOT EXISTS (SELECT 1 FROM @extschema@.tb_notification_rule_strike k
                        WHERE k.config_id OPERATOR(pg_catalog.=) p_config
                          AND k.suspended_until OPERATOR(pg_catalog.>) pg_catalog.now())
       AND NOT EXISTS (SELECT 1 FROM @extschema@.tb_error_notification_config c
                        WHERE c.config_id OPERATOR(pg_catalog.=) p_config
                          AND @extschema@._fraiseql_condition_problem(c.condition::text) IS NOT NULL)
$$;

-- A rule failed, or ran past the fold's time, in a fold: skipped for this
-- fold and suspended (see tb_notification_rule_strike), with a warning.
CREATE FUNCTION _fraiseql_rule_struck(p_config uuid, p_problem text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    k @extschema@.tb_notification_rule_strike;
BEGIN
    INSERT INTO @extschema@.tb_notification_rule_strike AS s (config_id, strikes, suspended_until, last_problem)
    VALUES (p_config, 1, now() + interval '1 minute', left(p_problem, 1000))
    ON CONFLICT (config_id) DO UPDATE
       SET strikes = s.strikes + 1,
           suspended_until = now() + least(interval '1 minute' * power(2, least(s.strikes, 10)), interval '1 hour'),
           last_problem = excluded.last_problem
    RETURNING * INTO k;
    DELETE FROM @extschema@.tb_notification_rule_strike s WHERE s.suspended_until < now() - interval '1 day';
    RAISE WARNING 'fraiseql_obs: notification rule % skipped for this fold and suspended until %: %',
        p_config, k.suspended_until, p_problem
        USING HINT = 'Its notifications are not sent meanwhile. Make its condition cheaper; a change to the condition ends the suspension (v_notification_rules.suspended_until).';
EXCEPTION WHEN OTHERS THEN
    -- (the rule was deleted meanwhile: nothing to suspend)
    RAISE WARNING 'fraiseql_obs: notification rule % skipped for this fold: %', p_config, p_problem;
END
$$;

-- A rule whose condition is changed by its writer is evaluated again at
-- once; its strikes stay, so a condition that is slow again is suspended
-- for longer (an edit is not a way to have every fold pay for it again).
CREATE FUNCTION _fraiseql_rule_pardon() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE @extschema@.tb_notification_rule_strike k SET suspended_until = now()
     WHERE k.config_id = NEW.config_id AND k.suspended_until > now();
    RETURN NULL;
END
$$;
CREATE TRIGGER notification_rule_pardon
    AFTER UPDATE OF condition ON tb_error_notification_config
    FOR EACH ROW WHEN (OLD.condition::text IS DISTINCT FROM NEW.condition::text)
    EXECUTE FUNCTION _fraiseql_rule_pardon();

-- The notification rules (all but milestones), on the occurrences one fold
-- counted (p_batch, ordered by group and time): the first occurrence of a
-- group the fold created is "new", the first of a group it reopened a
-- "regression", of one an archive condition reopened "escalating". No rule
-- notifies about an ignored (archived) group, nor, with skip_if_assigned,
-- about an assigned one. A rule with a frequency or users threshold fires
-- when this batch takes the group across it: not over it just before the
-- batch's first occurrence, over it at its last. Set-based first: an
-- occurrence a rule's rate limit or digest already covers costs no payload,
-- and of a rule with a window or a threshold only the first occurrence of a
-- group in the batch is looked at (unless a condition or a minimum count
-- may refuse it). A group reopened without an occurrence in the batch (its
-- row was busy at the fold that counted them) is announced with its latest
-- occurrence.
CREATE FUNCTION _fraiseql_notify_batch(p_batch _fraiseql_occurrence_ref[], p_created uuid[], p_regressed uuid[],
                                       p_escalated uuid[], p_only uuid DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_crossed uuid[];
    n        integer := 0;
BEGIN
    -- Frequency rules first, in a statement of their own: every (rule,
    -- group) pair of the batch is looked at and its state kept, whatever
    -- is made of a crossing below (a rate limit, an ignored group). The
    -- first occurrence that counts is the first within the window (an old
    -- timestamp cannot pass for the start of the batch).
    SELECT coalesce(array_agg(@extschema@._fraiseql_pair_id(r.config_id, g.error_id)), '{}') INTO v_crossed
      FROM @extschema@.tb_error_notification_config r
     CROSS JOIN LATERAL (SELECT b.error_id, min(b.occurred_at) AS t1 FROM unnest(p_batch) b
                          WHERE b.occurred_at > clock_timestamp() - r.frequency_window
                            AND b.occurred_at <= clock_timestamp() + interval '1 minute'
                            AND (r.environment IS NULL OR b.environment = ANY (r.environment))
                            AND (r.error_type IS NULL OR b.error_type = r.error_type)
                            AND (r.severity IS NULL OR b.severity = ANY (r.severity))
                          GROUP BY b.error_id) g
     CROSS JOIN LATERAL (SELECT e.error_fingerprint FROM @extschema@.tb_error_log e
                          WHERE e.error_id = g.error_id LIMIT 1) e
     WHERE r.enabled AND r.frequency_window IS NOT NULL AND r.notify_on_occurrence IS NULL
       AND (p_only IS NULL OR r.config_id = p_only)
       AND @extschema@._fraiseql_rule_live(r.config_id)
       AND (r.error_fingerprint IS NULL OR r.error_fingerprint = e.error_fingerprint
            OR EXISTS (SELECT 1 FROM @extschema@.tb_error_merge m
                        WHERE m.target_id = g.error_id AND m.fingerprint = r.error_fingerprint))
       AND @extschema@._fraiseql_frequency_crossed(r, g.error_id, g.t1);
    WITH late AS (
            -- regressions and escalations without an occurrence in this batch
            SELECT l.occurrence_id, l.occurred_at, l.error_id, l.error_type, l.severity, l.environment
              FROM unnest(p_regressed || p_escalated) AS r(id)
             CROSS JOIN LATERAL (SELECT lo.occurrence_id, lo.occurred_at, r.id AS error_id, lo.error_type,
                                        lo.severity, lo.environment FROM @extschema@.tb_error_occurrence lo
                                  WHERE lo.error_id = ANY (@extschema@.fraiseql_error_group_ids(r.id))
                                  ORDER BY lo.occurred_at DESC LIMIT 1) l
             WHERE NOT EXISTS (SELECT 1 FROM unnest(p_batch) b WHERE b.error_id = r.id)
        ), batch AS (
            SELECT b.*, false AS late FROM unnest(p_batch) b
            UNION ALL
            SELECT l.*, true FROM late l
        ), ev AS (
            SELECT b.*,
                   row_number() OVER w AS pos, count(*) OVER (PARTITION BY b.error_id) AS in_batch
              FROM batch b
            WINDOW w AS (PARTITION BY b.error_id ORDER BY b.occurred_at, b.occurrence_id)
        ), groups AS MATERIALIZED (
            -- each group of the batch probed once, by key (see the fold),
            -- however many of its occurrences the batch holds
            SELECT x.error_id, x.t1, g.occurrence_count + coalesce(p.occurrence_count, 0) AS counted,
                   g.error_fingerprint, g.assigned_to, x.types, x.severities, x.environments
              FROM (SELECT b.error_id, min(b.occurred_at) FILTER (WHERE NOT b.late) AS t1,
                           -- the kinds of occurrence the batch holds (see rule_groups)
                           array_agg(DISTINCT b.error_type) AS types, array_agg(DISTINCT b.severity) AS severities,
                           array_agg(DISTINCT b.environment) AS environments
                      FROM batch b GROUP BY b.error_id) x
             CROSS JOIN LATERAL (SELECT g.occurrence_count, g.error_fingerprint, g.assigned_to
                                   FROM @extschema@.tb_error_log g
                                  WHERE g.error_id = x.error_id AND g.status <> 'ignored' LIMIT 1) g
              LEFT JOIN LATERAL (SELECT p.occurrence_count FROM @extschema@.tb_error_count_pending p
                                  WHERE p.error_id = x.error_id LIMIT 1) p ON true
        ), rules AS MATERIALIZED (
            -- the rules' columns this statement reads, once (a field of a
            -- whole-row value is taken apart again at every use, for every
            -- pair); a rule of the kind first_only is only interested in
            -- the first occurrence it admits
            SELECT r.config_id, r.error_type, r.severity, r.environment, r.error_fingerprint,
                   r.skip_if_assigned, r.digest, r.rate_limit_minutes, r.frequency_window,
                   r.condition, r.min_occurrence_count,
                   r.notify_on_new, r.notify_on_regression, r.notify_on_escalation,
                   (r.rate_limit_minutes > 0 OR r.digest OR r.frequency_window IS NOT NULL)
                       AND r.condition IS NULL AND r.min_occurrence_count <= 1 AS first_only
              FROM @extschema@.tb_error_notification_config r
             WHERE r.enabled AND r.notify_on_occurrence IS NULL
               AND (p_only IS NULL OR r.config_id = p_only)
               AND @extschema@._fraiseql_rule_live(r.config_id)
        ), rule_groups AS MATERIALIZED (
            -- the (rule, group) pairs the rule's filters may admit: a rule
            -- whose type, severity or environment filter admits no
            -- occurrence of the group in the batch is not paired with it
            -- (each filter on its own: the exact test, on each occurrence,
            -- is in candidates); no equality here, so the rules against
            -- the groups, once each (no join the planner could misjudge)
            SELECT r.*, gr.error_id, gr.counted, gr.t1
              FROM groups gr
              JOIN rules r
                ON (r.error_type IS NULL OR r.error_type = ANY (gr.types))
               AND (r.severity IS NULL OR r.severity && gr.severities)
               AND (r.environment IS NULL OR r.environment && gr.environments)
               -- (a fingerprint's rule follows it into the group it was merged into)
               AND (r.error_fingerprint IS NULL OR r.error_fingerprint = gr.error_fingerprint
                    OR EXISTS (SELECT 1 FROM @extschema@.tb_error_merge m
                                WHERE m.target_id = gr.error_id AND m.fingerprint = r.error_fingerprint))
               AND NOT (r.skip_if_assigned AND gr.assigned_to IS NOT NULL)
               -- (no occurrence of the batch is counted past the group's count)
               AND gr.counted >= r.min_occurrence_count
        ), open_pairs AS MATERIALIZED (
            -- the (rule, group) pairs no rate limit or digest holds, each
            -- probed once
            SELECT x.* FROM rule_groups x
             WHERE NOT (x.digest AND EXISTS (
                       SELECT 1 FROM @extschema@.tb_notification_digest d
                        WHERE d.config_id = x.config_id AND d.error_id = x.error_id))
               AND NOT (NOT x.digest AND x.rate_limit_minutes > 0 AND EXISTS (
                       SELECT 1 FROM @extschema@.tb_notification_state s
                        WHERE s.config_id = x.config_id AND s.error_id = x.error_id
                          AND s.last_enqueued_at > now() - x.rate_limit_minutes * interval '1 minute'))
               -- a threshold: crossed by this batch
               AND (x.frequency_window IS NULL
                    OR @extschema@._fraiseql_pair_id(x.config_id, x.error_id) = ANY (v_crossed))
        ), firsts AS (
            -- what a first_only rule can admit: each group's first occurrence
            -- of each kind (type, severity, environment), and its regression
            SELECT DISTINCT ON (e.error_id, e.error_type, e.severity, e.environment, e.late) e.*
              FROM ev e
             ORDER BY e.error_id, e.error_type, e.severity, e.environment, e.late, e.pos
        ), candidates AS (
            SELECT o.config_id, o.condition, o.frequency_window, o.rate_limit_minutes, o.digest,
                   o.notify_on_new, o.notify_on_regression, o.notify_on_escalation, o.min_occurrence_count,
                   e.occurrence_id, e.occurred_at, e.error_id,
                   (e.pos = 1 AND e.error_id = ANY (p_created)) AS is_new,
                   (e.pos = 1 AND e.error_id = ANY (p_regressed)) AS is_regression,
                   (e.pos = 1 AND e.error_id = ANY (p_escalated)) AS is_escalation,
                   e.late, o.counted - (e.in_batch - e.pos) AS count_at, o.first_only
              FROM open_pairs o
              JOIN (SELECT f.*, true AS of_firsts FROM firsts f
                    UNION ALL
                    SELECT e.*, false FROM ev e) e
                ON e.error_id = o.error_id AND e.of_firsts = o.first_only
             WHERE (o.error_type IS NULL OR o.error_type = e.error_type)
               AND (o.severity IS NULL OR e.severity = ANY (o.severity))
               AND (o.environment IS NULL OR e.environment = ANY (o.environment))
        ), wanted AS (
            SELECT x.* FROM candidates x
             -- the kinds a rule asks for (any of them), or every occurrence
             WHERE (NOT (x.notify_on_new OR x.notify_on_regression OR x.notify_on_escalation)
                    OR (x.notify_on_new AND x.is_new)
                    OR (x.notify_on_regression AND x.is_regression)
                    OR (x.notify_on_escalation AND x.is_escalation))
               AND (NOT x.late OR ((x.is_regression OR x.is_escalation) AND x.frequency_window IS NULL))
               AND x.count_at >= x.min_occurrence_count
        ), chosen AS (
            -- a first_only rule: the first occurrence of the group it admits
            (SELECT DISTINCT ON (w.config_id, w.error_id) w.* FROM wanted w WHERE w.first_only
              ORDER BY w.config_id, w.error_id, w.occurred_at, w.occurrence_id)
            UNION ALL
            SELECT w.* FROM wanted w WHERE NOT w.first_only
        ), by_occurrence AS MATERIALIZED (
            -- each occurrence once, with the rules that look at it: its
            -- payload is built once however many rules test a condition on
            -- it (ten rules with a condition on every occurrence would
            -- build it ten times), for the condition and the message alike
            SELECT o.*, pl.payload
              FROM (SELECT w.occurrence_id, w.occurred_at, w.error_id, w.count_at, w.is_new, w.is_regression,
                           w.is_escalation, array_agg(w.config_id ORDER BY w.config_id) AS configs,
                           array_agg(w.condition ORDER BY w.config_id) AS conditions
                      FROM chosen w
                     GROUP BY 1, 2, 3, 4, 5, 6, 7) o
             CROSS JOIN LATERAL (  -- (one deleted meanwhile is not announced)
                   SELECT @extschema@._fraiseql_occurrence_payload(x, g, o.count_at) AS payload
                     FROM @extschema@.tb_error_occurrence x, @extschema@.tb_error_log g
                    WHERE x.occurrence_id = o.occurrence_id AND x.occurred_at = o.occurred_at
                      AND g.error_id = o.error_id
                    LIMIT 1) pl
        ), fired AS (
            -- each (occurrence, rule) to announce; a condition is tested
            -- here, set-based, so that an occurrence it refuses (most of
            -- them, usually) costs nothing more
            SELECT o.occurrence_id, o.occurred_at, o.error_id, o.is_new, o.is_regression, o.is_escalation,
                   u.config_id, r.digest, r.rate_limit_minutes, r.frequency_window, r.frequency_threshold,
                   r.users_threshold, o.payload
              FROM by_occurrence o
             CROSS JOIN LATERAL unnest(o.configs, o.conditions) AS u(config_id, condition)
             CROSS JOIN LATERAL (SELECT r.digest, r.rate_limit_minutes, r.frequency_window, r.frequency_threshold,
                                        r.users_threshold
                                   FROM @extschema@.tb_error_notification_config r
                                  WHERE r.config_id = u.config_id) r
             WHERE u.condition IS NULL
                OR coalesce(jsonb_path_match(o.payload, u.condition, silent => true), false)
        ), announced AS (
            -- a rule with a rate limit, a digest or a threshold: the first
            -- occurrence of the group only (the window it opens covers the
            -- others); any other rule: each
            (SELECT DISTINCT ON (f.config_id, f.error_id) f.* FROM fired f
              WHERE f.rate_limit_minutes > 0 OR f.digest OR f.frequency_window IS NOT NULL
              ORDER BY f.config_id, f.error_id, f.occurred_at, f.occurrence_id)
            UNION ALL
            SELECT f.* FROM fired f
             WHERE NOT (f.rate_limit_minutes > 0 OR f.digest OR f.frequency_window IS NOT NULL)
        ), messages AS MATERIALIZED (
            SELECT a.config_id, a.error_id, a.digest, a.rate_limit_minutes, a.occurred_at, a.occurrence_id, x.reason,
                   a.payload
                   || CASE WHEN a.frequency_window IS NOT NULL
                           THEN jsonb_build_object('frequency', jsonb_strip_nulls(jsonb_build_object(
                                'window', a.frequency_window, 'more_than_occurrences', a.frequency_threshold,
                                'more_than_users', a.users_threshold)))
                           ELSE '{}' END
                   || jsonb_build_object('reason', x.reason) AS payload
              FROM announced a
             CROSS JOIN LATERAL (SELECT CASE WHEN a.is_new THEN 'new' WHEN a.is_regression THEN 'regression'
                                             WHEN a.is_escalation THEN 'escalating'
                                             WHEN a.frequency_window IS NOT NULL THEN 'frequency'
                                             ELSE 'occurrence' END AS reason) x
        ), digested AS (
            -- a digest rule: the group joins the rule's current window
            INSERT INTO @extschema@.tb_notification_digest (config_id, error_id, window_start)
            SELECT m.config_id, m.error_id, now() FROM messages m WHERE m.digest
            ON CONFLICT DO NOTHING
        ), windows AS (
            -- a rate-limited rule: its window opens now (one not yet over
            -- was left out by open_pairs; folds are serialized)
            INSERT INTO @extschema@.tb_notification_state AS s (config_id, error_id, last_enqueued_at)
            SELECT m.config_id, m.error_id, now() FROM messages m
             WHERE NOT m.digest AND m.rate_limit_minutes > 0
            ON CONFLICT (config_id, error_id) DO UPDATE SET last_enqueued_at = excluded.last_enqueued_at
            RETURNING s.config_id, s.error_id
        ), queued AS (
            INSERT INTO @extschema@.tb_notification_queue (config_id, error_id, reason, payload)
            SELECT m.config_id, m.error_id, m.reason, m.payload FROM messages m
             WHERE NOT m.digest
               AND (m.rate_limit_minutes = 0
                    OR EXISTS (SELECT 1 FROM windows w WHERE w.config_id = m.config_id AND w.error_id = m.error_id))
             ORDER BY m.error_id, m.occurred_at, m.occurrence_id, m.config_id
            RETURNING 1
        )
    SELECT count(*) INTO n FROM queued;
    IF n > 0 THEN
        PERFORM @extschema@._fraiseql_wake_worker();
    END IF;
    RETURN n;
END
$$;

-- One key for a (rule, group) pair.
CREATE FUNCTION _fraiseql_pair_id(a uuid, b uuid) RETURNS uuid
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT md5(a::text || b::text)::uuid $$;

-- The error as a notification about one occurrence describes it; the count
-- is the group's as of that occurrence. A bare expression (no SET, names
-- qualified) so that the planner inlines it: the fold builds one for every
-- occurrence a rule with a condition looks at.
CREATE FUNCTION _fraiseql_occurrence_payload(o tb_error_occurrence, g tb_error_log, p_count bigint) RETURNS jsonb
LANGUAGE sql STABLE
AS $$
    SELECT pg_catalog.jsonb_build_object(
        'error_id', g.error_id, 'error_fingerprint', g.error_fingerprint, 'error_type', g.error_type,
        'error_message', o.message, 'severity', g.severity,
        'occurrence_count', p_count, 'first_seen', g.first_seen,
        'last_seen', greatest(g.last_seen, o.occurred_at),
        'environment', o.environment,
        'release_version', coalesce(o.release_version, g.release_version),
        'stack_trace', pg_catalog.left(coalesce(o.stack_trace, g.stack_trace), 16384),
        'title', g.title, 'culprit', g.culprit, 'status', g.status,
        'context', o.context, 'trace_id', o.trace_id)
$$;

-- Milestones crossed by a fold: exact, since folds are serialized per group.
-- Set-based: one notification per rule and milestone crossed (milestones
-- are exact by design: no rate limit), into the digest for a digest rule.
CREATE FUNCTION _fraiseql_notify_milestones(p_folds _fraiseql_fold[], p_only uuid DEFAULT NULL) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n integer;
BEGIN
    WITH crossed AS (
        SELECT r.config_id, r.digest, r.condition, f.error_id, m.m,
               @extschema@._fraiseql_group_payload(g.g) AS payload
          FROM unnest(p_folds) f
         CROSS JOIN LATERAL (SELECT g FROM @extschema@.tb_error_log g
                              WHERE g.error_id = f.error_id AND g.status <> 'ignored' LIMIT 1) g
          JOIN @extschema@.tb_error_notification_config r
            ON r.enabled AND r.notify_on_occurrence IS NOT NULL
           AND (p_only IS NULL OR r.config_id = p_only)
           AND @extschema@._fraiseql_rule_live(r.config_id)
           AND NOT (r.skip_if_assigned AND (g.g).assigned_to IS NOT NULL)
           AND (r.error_fingerprint IS NULL OR r.error_fingerprint = (g.g).error_fingerprint
                OR EXISTS (SELECT 1 FROM @extschema@.tb_error_merge m
                            WHERE m.target_id = f.error_id AND m.fingerprint = r.error_fingerprint))
           AND @extschema@._fraiseql_rule_admits(r, NULL, (g.g).error_type,
                                                 (g.g).severity, (g.g).environment)
         CROSS JOIN LATERAL (SELECT DISTINCT x AS m FROM unnest(r.notify_on_occurrence) x
                              WHERE x > f.old_count AND x <= f.new_count
                                AND x > coalesce((SELECT s.milestone FROM @extschema@.tb_notification_state s
                                                   WHERE s.config_id = r.config_id AND s.error_id = f.error_id), 0)) m
    ), admitted AS MATERIALIZED (
        SELECT c.* FROM crossed c
         WHERE c.condition IS NULL OR coalesce(jsonb_path_match(c.payload, c.condition, silent => true), false)
    ), digested AS (
        INSERT INTO @extschema@.tb_notification_digest (config_id, error_id, window_start)
        SELECT DISTINCT a.config_id, a.error_id, now() FROM admitted a WHERE a.digest
        ON CONFLICT DO NOTHING
    ), announced AS (
        INSERT INTO @extschema@.tb_notification_state AS s (config_id, error_id, last_enqueued_at, milestone)
        SELECT a.config_id, a.error_id, now(), max(a.m) FROM admitted a GROUP BY 1, 2
        ON CONFLICT (config_id, error_id) DO UPDATE
           SET milestone = greatest(s.milestone, excluded.milestone), last_enqueued_at = excluded.last_enqueued_at
    ), queued AS (
        INSERT INTO @extschema@.tb_notification_queue (config_id, error_id, reason, payload)
        SELECT a.config_id, a.error_id, 'milestone',
               a.payload || jsonb_build_object('occurrence_count', a.m, 'milestone', a.m, 'reason', 'milestone')
          FROM admitted a WHERE NOT a.digest
         ORDER BY a.error_id, a.m, a.config_id
        RETURNING 1
    )
    SELECT count(*) INTO n FROM queued;
    IF n > 0 THEN
        PERFORM @extschema@._fraiseql_wake_worker();
    END IF;
    RETURN n;
END
$$;

-- Digests whose window has passed become one queued message each.
CREATE FUNCTION _fraiseql_queue_due_digests() RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;
    n integer := 0;
BEGIN
    -- (at every delivery batch: the statement below opens every occurrence
    -- partition when it starts, milliseconds, for nothing most of the time)
    IF NOT EXISTS (SELECT 1 FROM @extschema@.tb_notification_digest d
                    WHERE d.window_start <= now() - interval '1 minute') THEN
        RETURN 0;
    END IF;
    FOR r IN
        SELECT c.config_id, min(d.window_start) AS window_start,
               jsonb_agg(jsonb_build_object(
                   'error_id', g.error_id, 'error_type', g.error_type, 'title', g.title,
                   'environment', g.environment, 'severity', g.severity,
                   'occurrences_in_window', (SELECT count(*) FROM @extschema@.tb_error_occurrence o
                                              WHERE o.error_id = ANY (@extschema@.fraiseql_error_group_ids(g.error_id))
                                                AND o.occurred_at >= d.window_start))
                   ORDER BY g.last_seen DESC) AS errors,
               (array_agg(g.error_id ORDER BY g.last_seen DESC))[1] AS any_error
          FROM @extschema@.tb_notification_digest d
          JOIN @extschema@.tb_error_notification_config c ON c.config_id = d.config_id
          JOIN @extschema@.tb_error_log g ON g.error_id = d.error_id
         GROUP BY c.config_id, c.rate_limit_minutes
        HAVING min(d.window_start) <= now() - c.rate_limit_minutes * interval '1 minute'
    LOOP
        INSERT INTO @extschema@.tb_notification_queue (config_id, error_id, reason, payload)
        VALUES (r.config_id, r.any_error, 'digest',
                jsonb_build_object('reason', 'digest', 'window_start', r.window_start, 'window_end', now(),
                                   'errors', r.errors, 'error_count', jsonb_array_length(r.errors),
                                   'error_type', 'Digest', 'error_message',
                                   jsonb_array_length(r.errors) || ' errors since ' || r.window_start,
                                   'severity', 'info', 'environment', ''));
        DELETE FROM @extschema@.tb_notification_digest d WHERE d.config_id = r.config_id AND d.window_start <= now();
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;

-- The worker's claim: due deliveries, leased (locked_until) so that a
-- delivery in flight is not claimed twice, and retried after the lease if the
-- worker died mid-delivery (same delivery_id: receivers can deduplicate).
CREATE FUNCTION _fraiseql_claim_deliveries(p_limit integer, p_lease interval, p_max_attempts integer)
RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v jsonb;
BEGIN
    PERFORM @extschema@._fraiseql_queue_due_digests();
    -- A lease that ran out with no outcome recorded was an attempt all the
    -- same (the worker stopped in flight: a crash, or a custom handler past
    -- its hard deadline). After the last one the delivery fails instead of
    -- being claimed again, so no delivery can stop the worker for ever.
    WITH lost AS (
        DELETE FROM @extschema@.tb_notification_queue q
         WHERE q.delivery_id IN (
               SELECT l.delivery_id FROM @extschema@.tb_notification_queue l
                WHERE l.locked_until < now() AND l.attempt >= p_max_attempts
                FOR UPDATE SKIP LOCKED)
        RETURNING q.*
    )
    INSERT INTO @extschema@.tb_error_notification_log
        (config_id, error_id, channel_type, status, error_message, attempt, delivery_id)
    SELECT l.config_id, l.error_id, coalesce(r.channel_type, '?'), 'failed',
           'no outcome was recorded within the delivery''s lease: the worker stopped while delivering it',
           l.attempt, l.delivery_id
      FROM lost l
      LEFT JOIN @extschema@.tb_error_notification_config r ON r.config_id = l.config_id;
    WITH due AS (
        SELECT q.delivery_id FROM @extschema@.tb_notification_queue q
         WHERE q.next_attempt_at <= now() AND (q.locked_until IS NULL OR q.locked_until < now())
         ORDER BY q.next_attempt_at
         LIMIT p_limit
         FOR UPDATE SKIP LOCKED
    ), claimed AS (
        UPDATE @extschema@.tb_notification_queue q
           SET locked_until = now() + p_lease, attempt = q.attempt + 1
          FROM due WHERE q.delivery_id = due.delivery_id
        RETURNING q.*
    )
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'delivery_id', c.delivery_id, 'config_id', c.config_id, 'error_id', c.error_id,
               'attempt', c.attempt, 'reason', c.reason, 'payload', c.payload || jsonb_build_object('delivery_id', c.delivery_id),
               'channel_type', r.channel_type,
               'config', @extschema@._fraiseql_channel_config(ch.default_config, r.channel_config),
               'template', r.message_template,
               'handler', ch.handler,
               'rule_exists', r.config_id IS NOT NULL AND r.enabled)), '[]')
      INTO v
      FROM claimed c
      LEFT JOIN @extschema@.tb_error_notification_config r ON r.config_id = c.config_id
      LEFT JOIN @extschema@.tb_notification_channel ch ON ch.channel_type = r.channel_type;
    RETURN v;
END
$$;

-- Records the outcome of attempts: a log row each; sent or finally failed
-- deliveries leave the queue, others are retried with exponential backoff.
CREATE FUNCTION _fraiseql_record_deliveries(p_results jsonb, p_max_attempts integer, p_retry_base interval)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- one statement for the batch (a turn of a loop per delivery cost the
    -- worker more than sending a pg_notify)
    WITH r AS (
        SELECT x.*, coalesce(x.deferred, false) AS put_back,
               x.ok OR x.attempt >= p_max_attempts OR coalesce(x.permanent, false) AS final
          FROM jsonb_to_recordset(p_results) AS x(delivery_id uuid, config_id uuid, error_id uuid, channel_type text,
                                                  attempt integer, ok boolean, permanent boolean, error text,
                                                  response_code text, recipient text, duration_ms integer,
                                                  deferred boolean, later boolean)
    ), put_back AS (
        -- not attempted (its destination had enough in flight): back in
        -- the queue, unattempted, behind what else is due
        UPDATE @extschema@.tb_notification_queue q
           SET locked_until = NULL, attempt = greatest(q.attempt - 1, 0),
               next_attempt_at = CASE WHEN r.later THEN now() + interval '1 second' ELSE q.next_attempt_at END
          FROM r WHERE r.put_back AND q.delivery_id = r.delivery_id
    ), logged AS (
        INSERT INTO @extschema@.tb_error_notification_log
            (config_id, error_id, channel_type, recipient, status, error_message, attempt, response_code,
             duration_ms, delivery_id)
        SELECT r.config_id, r.error_id, r.channel_type, r.recipient,
               CASE WHEN r.ok THEN 'sent' WHEN r.final THEN 'failed' ELSE 'retrying' END,
               r.error, r.attempt, r.response_code, r.duration_ms, r.delivery_id
          FROM r WHERE NOT r.put_back
    ), done AS (
        DELETE FROM @extschema@.tb_notification_queue q
         USING r WHERE NOT r.put_back AND r.final AND q.delivery_id = r.delivery_id
    ), again AS (
        UPDATE @extschema@.tb_notification_queue q
           SET locked_until = NULL, last_error = r.error,
               next_attempt_at = now() + least(p_retry_base * power(2, r.attempt - 1), interval '1 hour')
          FROM r WHERE NOT r.put_back AND NOT r.final AND q.delivery_id = r.delivery_id
    )
    -- (informative: a rule row another transaction holds, one being edited,
    -- keeps its time rather than hold up the deliveries; once a rule a batch)
    UPDATE @extschema@.tb_error_notification_config c SET last_triggered = now()
     WHERE c.config_id IN (SELECT x.config_id FROM @extschema@.tb_error_notification_config x
                            WHERE x.config_id IN (SELECT r.config_id FROM r WHERE r.ok AND NOT r.put_back)
                              FOR NO KEY UPDATE SKIP LOCKED);
END
$$;

-- Delivers what is due, for a database served by no worker (the library
-- not in shared_preload_libraries): call it from pg_cron or a script, e.g.
-- every minute: CALL fraiseql_deliver_notifications();
-- Each batch is claimed and committed, sent with nothing locked, then
-- recorded and committed (a procedure, so that it can commit in between:
-- it takes no SET clause, and names everything by schema instead).
-- Runs as its caller; a custom handler runs as its function's owner, as in
-- the worker. With the worker running, it is harmless (claims are leases).
CREATE PROCEDURE fraiseql_deliver_notifications(max_batches integer DEFAULT 10)
LANGUAGE plpgsql
AS $$
DECLARE
    v_claimed jsonb;
BEGIN
    -- the fold evaluates the rules on what was captured
    PERFORM @extschema@.fraiseql_flush_counts();
    COMMIT;
    FOR i IN 1..GREATEST(max_batches, 1) LOOP
        v_claimed := @extschema@._fraiseql_claim_due();
        COMMIT;
        EXIT WHEN pg_catalog.jsonb_array_length(v_claimed) OPERATOR(pg_catalog.=) 0;
        PERFORM @extschema@._fraiseql_record_due(@extschema@._fraiseql_send_deliveries(v_claimed));
        COMMIT;
    END LOOP;
END
$$;

-- When the worker's maintenance is next due: `every` after its last run, or
-- within a minute when that run skipped a step for a lock (a report was
-- holding the table: retried soon, so that only a session that holds it for
-- good keeps a partition past retention; see v_maintenance_steps).
CREATE FUNCTION _fraiseql_next_maintenance(p_every interval) RETURNS timestamptz
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(
        (SELECT m.started_at + CASE WHEN cardinality(m.skipped) > 0
                                    THEN least(p_every, interval '1 minute') ELSE p_every END
           FROM @extschema@.tb_maintenance_run m WHERE m.triggered_by = 'worker'
          ORDER BY m.started_at DESC LIMIT 1),
        now() + p_every)
$$;

-- When this database next needs its worker if nothing wakes it before: a
-- retry, a lease that runs out, a digest window that closes, an archive
-- that ends, maintenance.
CREATE FUNCTION _fraiseql_next_due(p_maintenance_every interval) RETURNS timestamptz
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT least(
        @extschema@._fraiseql_next_maintenance(p_maintenance_every),
        (SELECT min(greatest(q.next_attempt_at, coalesce(q.locked_until, q.next_attempt_at)))
           FROM @extschema@.tb_notification_queue q),
        (SELECT min(d.window_start + c.rate_limit_minutes * interval '1 minute')
           FROM @extschema@.tb_notification_digest d
           JOIN @extschema@.tb_error_notification_config c ON c.config_id = d.config_id),
        -- an archive for an interval that ends (the fold unresolves it)
        (SELECT min(g.archive_until) FROM @extschema@.tb_error_log g WHERE g.archive_until IS NOT NULL))
$$;

-- Notifications waiting or being retried.
CREATE VIEW v_notification_queue AS
SELECT q.delivery_id, q.config_id, r.channel_type, q.error_id, q.reason, q.attempt, q.next_attempt_at,
       q.locked_until, q.created_at, q.last_error
  FROM tb_notification_queue q
  LEFT JOIN tb_error_notification_config r ON r.config_id = q.config_id
 ORDER BY q.next_attempt_at;
