-- fraiseql_obs: notification rules (the tables are in schema.sql).
--
-- The seed's examples insert rules without a channel_type when the
-- channel_config says which channel it is ('{"webhook_url": ...}' is Slack's
-- incoming webhook). This trigger fills it in, and normalizes empty filters.
CREATE FUNCTION _fraiseql_notification_config_defaults() RETURNS trigger
LANGUAGE plpgsql
SET search_path = @extschema@, pg_temp
AS $$
BEGIN
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
    IF NEW.severity = '{}' THEN NEW.severity := NULL; END IF;
    IF NEW.environment = '{}' THEN NEW.environment := NULL; END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER notification_config_defaults
    BEFORE INSERT OR UPDATE ON tb_error_notification_config
    FOR EACH ROW EXECUTE FUNCTION _fraiseql_notification_config_defaults();
