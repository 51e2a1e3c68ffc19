-- Least privilege (loaded last, once every function exists).
--
-- Nothing is granted to PUBLIC. Calling roles are enabled explicitly: memory.grant_usage(role)
-- for the API functions, memory.grant_admin(role) for admins. Tables have row level security with
-- owner policies, so a role given direct SELECT sees only its own rows; only the worker, the
-- definer functions and admins write them.

-- The API a calling role gets with grant_usage().
CREATE FUNCTION memory._usage_functions()
RETURNS regprocedure[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT ARRAY[
        'memory.current_identity()', 'memory.create_chat(text)',
        'memory.enqueue(text, text, text)', 'memory.get(text)', 'memory.status(uuid)',
        'memory.wait(uuid, interval)', 'memory.history(text)', 'memory.forget(text)',
        'memory.retry_failed(text)', 'memory.count_tokens(text)', 'memory.context(text, integer)',
        'memory.rollback(text, bigint)', 'memory.rebuild(text)', 'memory.forget_snippet(uuid)',
        -- about the caller only: the parts of current_identity(), and _is_admin() (the RLS
        -- policies) with the catalog query it asks, which run with the caller's rights
        'memory._invoker()', 'memory._jwt_sub()', 'memory._is_admin()',
        'memory._is_admin_catalog()', 'memory._owns_chat(text)',
        -- settings read through the library, by get() and _is_admin()
        'memory._admin_role()', 'memory._audit_reads()', 'memory._token_limit()',
        -- called by wait(), which runs with the caller's rights
        'memory._queue_row_xmin(uuid)'
    ]::regprocedure[]
$$;

-- What grant_admin() adds.
CREATE FUNCTION memory._admin_functions()
RETURNS regprocedure[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT ARRAY[
        'memory.process_pending(integer)', 'memory.worker_status()',
        'memory.grant_usage(regrole)', 'memory.revoke_usage(regrole)',
        'memory.grant_admin(regrole)', 'memory.revoke_admin(regrole)',
        'memory.watch(regclass, name, name, name, name)', 'memory.unwatch(regclass)',
        'memory.forget_owner(text)', 'memory.set_owner_budget(text, bigint)',
        -- read by the memory.watched and memory.owner_usage views, with the reader's rights
        'memory._trigger_args(bytea)', 'memory._utc_today()', 'memory._owner_budget(text, bigint)',
        'memory._owner_daily_tokens()', 'memory._budget_deferred_message()',
        'memory._owner_usage_today()',
        -- the audit_direct_write triggers' WHEN runs with the writer's rights: a role given table
        -- privileges without it cannot write them at all (rather than unaudited)
        'memory._superuser()'
    ]::regprocedure[]
$$;

CREATE FUNCTION memory._grant_functions(p_grant bool, p_functions regprocedure[], p_role regrole)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    f regprocedure;
BEGIN
    FOREACH f IN ARRAY p_functions LOOP
        IF p_grant THEN
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', f, p_role);
        ELSE
            EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM %s', f, p_role);
        END IF;
    END LOOP;
END
$$;

CREATE FUNCTION memory._check_role(p_role regrole)
RETURNS void
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_role IS NULL THEN
        RAISE EXCEPTION 'role must not be null' USING ERRCODE = '22023';
    END IF;
END
$$;

-- The privileges of grant_usage(), which grant_admin() includes.
CREATE FUNCTION memory._grant_usage(p_role regrole)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA memory TO %s', p_role);
    PERFORM memory._grant_functions(true, memory._usage_functions(), p_role);
END
$$;

-- Let a role call the API (its identity, or its users' JWT sub, owns what it creates).
CREATE FUNCTION memory.grant_usage(p_role regrole)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM memory._require_admin('memory.grant_usage()');
    PERFORM memory._check_role(p_role);
    PERFORM memory._grant_usage(p_role);
    PERFORM memory._audit('grant_usage', NULL, NULL, p_role::text);
END
$$;

CREATE FUNCTION memory.revoke_usage(p_role regrole)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM memory._require_admin('memory.revoke_usage()');
    PERFORM memory._check_role(p_role);
    PERFORM memory._grant_functions(false, memory._usage_functions(), p_role);
    IF NOT EXISTS (SELECT 1 FROM memory.admin_roles a WHERE a.role = p_role) THEN
        EXECUTE format('REVOKE USAGE ON SCHEMA memory FROM %s', p_role);
    END IF;
    PERFORM memory._audit('revoke_usage', NULL, NULL, p_role::text);
END
$$;

-- The privileges of grant_admin(): the API, the worker functions, the tables and views.
CREATE FUNCTION memory._grant_admin_privileges(p_role regrole)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM memory._grant_usage(p_role);
    PERFORM memory._grant_functions(true, memory._admin_functions(), p_role);
    EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA memory TO %s', p_role);
    EXECUTE format('GRANT INSERT, UPDATE, DELETE ON memory.chat_metadata, '
                   'memory.chat_context_queue, memory.chat_memory_history, memory.fact_keys '
                   'TO %s', p_role);
    EXECUTE format('GRANT USAGE ON SEQUENCE memory.chat_context_queue_seq TO %s', p_role);
END
$$;

-- Make a role's members admins: every chat, the tables and views, the worker functions.
CREATE FUNCTION memory.grant_admin(p_role regrole)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM memory._require_admin('memory.grant_admin()');
    PERFORM memory._check_role(p_role);
    PERFORM memory._grant_admin_privileges(p_role);
    INSERT INTO memory.admin_roles (role) VALUES (p_role) ON CONFLICT DO NOTHING;
    PERFORM memory._audit('grant_admin', NULL, NULL, p_role::text);
END
$$;

CREATE FUNCTION memory.revoke_admin(p_role regrole)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM memory._require_admin('memory.revoke_admin()');
    PERFORM memory._check_role(p_role);
    DELETE FROM memory.admin_roles a WHERE a.role = p_role;
    PERFORM memory._grant_functions(false, memory._admin_functions(), p_role);
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA memory FROM %s', p_role);
    EXECUTE format('REVOKE ALL ON SEQUENCE memory.chat_context_queue_seq FROM %s', p_role);
    PERFORM memory._audit('revoke_admin', NULL, NULL, p_role::text);
END
$$;

-- Row level security. The table owner (the definer functions, the worker as superuser)
-- bypasses it; any role given direct access sees its own rows, admins all of them.
ALTER TABLE memory.chat_metadata ENABLE ROW LEVEL SECURITY;
CREATE POLICY owner_reads ON memory.chat_metadata FOR SELECT
    USING (owner = memory.current_identity());
CREATE POLICY admin_all ON memory.chat_metadata FOR ALL
    USING (memory._is_admin()) WITH CHECK (memory._is_admin());

-- By the chat's owner, not enqueued_by: an admin may enqueue on the owner's behalf.
ALTER TABLE memory.chat_context_queue ENABLE ROW LEVEL SECURITY;
CREATE POLICY owner_reads ON memory.chat_context_queue FOR SELECT
    USING (memory._owns_chat(chat_id));
CREATE POLICY admin_all ON memory.chat_context_queue FOR ALL
    USING (memory._is_admin()) WITH CHECK (memory._is_admin());

ALTER TABLE memory.chat_memory_history ENABLE ROW LEVEL SECURITY;
CREATE POLICY owner_reads ON memory.chat_memory_history FOR SELECT
    USING (memory._owns_chat(chat_id));
CREATE POLICY admin_all ON memory.chat_memory_history FOR ALL
    USING (memory._is_admin()) WITH CHECK (memory._is_admin());

ALTER TABLE memory.audit_log ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_reads ON memory.audit_log FOR SELECT USING (memory._is_admin());

ALTER TABLE memory.llm_usage_daily ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_reads ON memory.llm_usage_daily FOR SELECT USING (memory._is_admin());

ALTER TABLE memory.admin_roles ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_reads ON memory.admin_roles FOR SELECT USING (memory._is_admin());

ALTER TABLE memory.fact_keys ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_all ON memory.fact_keys FOR ALL
    USING (memory._is_admin()) WITH CHECK (memory._is_admin());

ALTER TABLE memory.owner_turns ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_reads ON memory.owner_turns FOR SELECT USING (memory._is_admin());

ALTER TABLE memory.owner_usage_daily ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_reads ON memory.owner_usage_daily FOR SELECT USING (memory._is_admin());

ALTER TABLE memory.owner_budgets ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_reads ON memory.owner_budgets FOR SELECT USING (memory._is_admin());

ALTER TABLE memory.capture_inbox ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_reads ON memory.capture_inbox FOR SELECT USING (memory._is_admin());

-- The audit log is append-only for everyone but superusers (the worker's retention included),
-- whatever privileges or ownership a role has.
CREATE FUNCTION memory._audit_log_append_only()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT coalesce((SELECT r.rolsuper FROM pg_catalog.pg_roles r
                      WHERE r.rolname = memory._invoker()), false) THEN
        RAISE EXCEPTION 'memory.audit_log is append-only' USING ERRCODE = '42501';
    END IF;
    RETURN CASE TG_OP WHEN 'UPDATE' THEN NEW WHEN 'DELETE' THEN OLD END;
END
$$;
CREATE TRIGGER append_only BEFORE UPDATE OR DELETE ON memory.audit_log
    FOR EACH ROW EXECUTE FUNCTION memory._audit_log_append_only();

-- Direct writes to the chat tables (an admin with table privileges changing an owner, deleting a
-- history) bypass the API's checks and its audit rows: every such statement is audited. The API's
-- definer functions and the worker run as superusers, which skip the trigger (WHEN), so the hot
-- paths pay one cheap test per statement.
CREATE FUNCTION memory._audit_direct_write()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM memory._audit('direct_' || lower(TG_OP), NULL, NULL,
        format('%s on memory.%s: %s', TG_OP, TG_TABLE_NAME, left(current_query(), 500)));
    RETURN NULL;
END
$$;
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['chat_metadata', 'chat_context_queue', 'chat_memory_history',
                             'admin_roles', 'fact_keys'] LOOP
        EXECUTE format('CREATE TRIGGER audit_direct_write AFTER INSERT OR UPDATE OR DELETE '
                       'ON memory.%I FOR EACH STATEMENT WHEN (NOT memory._superuser()) '
                       'EXECUTE FUNCTION memory._audit_direct_write()', t);
    END LOOP;
END
$$;
CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON memory.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION memory._audit_log_append_only();

-- Captured rows have no foreign key (it would cost every capture a check): a chat deleted other
-- than through forget() (an admin's direct DELETE, TRUNCATE ... CASCADE) takes its captured rows
-- along here, so they can never be moved into a later chat of the same id.
CREATE FUNCTION memory._erase_captured()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM memory.capture_inbox;
    ELSE
        DELETE FROM memory.capture_inbox i
         WHERE i.chat_id IN (SELECT o.chat_id FROM memory_ext_deleted_chats o);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER erase_captured AFTER DELETE ON memory.chat_metadata
    REFERENCING OLD TABLE AS memory_ext_deleted_chats
    FOR EACH STATEMENT EXECUTE FUNCTION memory._erase_captured();
CREATE TRIGGER erase_captured_truncate AFTER TRUNCATE ON memory.chat_metadata
    FOR EACH STATEMENT EXECUTE FUNCTION memory._erase_captured();

-- Nothing for PUBLIC: not the schema, not the tables, not the functions (revoking the default
-- EXECUTE every new function gets).
REVOKE ALL ON SCHEMA memory FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA memory FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA memory FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA memory FROM PUBLIC;

-- Supabase: signed-in users get the API, the service role (admin already, as the default
-- memory_ext.admin_role) the admin privileges, anon nothing. Privileges only: rows written here
-- into tables that pg_dump saves would collide with the dumped ones when a dump is restored
-- (CREATE EXTENSION runs again first), and these privileges are recorded in pg_init_privs.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'authenticated') THEN
        PERFORM memory._grant_usage('authenticated');
    END IF;
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'service_role') THEN
        PERFORM memory._grant_admin_privileges('service_role');
    END IF;
END
$$;
