-- Automatic capture: rows inserted into an app's own message table become snippets of their chat,
-- in the inserting transaction (a rolled-back insert enqueues nothing; the worker wakes at COMMIT).
--
-- One statement-level AFTER INSERT trigger per watched table, with a transition table: one pass
-- per INSERT or COPY statement, however many rows. What is watched lives only in pg_trigger (the
-- trigger's arguments are the column names), so DROP TABLE takes it along, pg_dump keeps it with
-- the table, and nothing can dangle. The trigger is named memory_ext_capture.
--
-- The app's insert never fails because memory cannot take a row: a blank text, a NULL chat, an
-- invalid chat id or a row claiming someone else's chat is skipped (and audited as
-- 'watch_skipped' / 'denied:watch'); an oversized text is cut to memory_ext.max_snippet_bytes at a
-- character boundary (the start of a message carries what memory keeps). The rate limit does not
-- apply: the app decides what it inserts.

-- The trigger function, in Rust (src/capture.rs): it reads the transition table's rows in order,
-- skips those without a text or a valid chat id, and takes each other row as a snippet of its
-- chat. The common case, a row into an existing chat of its owner (the inserting identity's, or
-- an admin's row on the owner's behalf), is three saved statements: the chat row locked FOR KEY
-- SHARE before the seq is drawn, as enqueue() does, the row written to memory.capture_inbox
-- (moved into the queue, with its audit row, by whoever next holds the chat), and an idle chat
-- marked due.
-- Any other row goes through memory._capture_row. Definer rights: the inserting role has no
-- privileges on memory's tables; identity and admin status still come from the inserting role
-- and its JWT (memory._invoker()). Column values are read as their type's text output.
CREATE FUNCTION memory._capture()
RETURNS trigger
LANGUAGE c VOLATILE PARALLEL UNSAFE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'capture_wrapper';

-- A captured row the trigger's common case did not take (src/capture.rs tries that first): its
-- chat is new (created for the row's owner when the inserting identity may), or the row may go
-- into another owner's chat (an admin without an owner column, on the owner's behalf, as
-- enqueue() allows). enqueue()'s way, into the queue, with its audit row. p_owner is the row's
-- owner (or the inserting identity); p_text is already prefixed with its role and cut to the size
-- limit. Returns the queue row's id, or NULL when the row is refused (another owner's chat, or
-- not the inserting identity's row).
CREATE FUNCTION memory._capture_row(p_chat text, p_owner text, p_text text, p_source text,
                                    p_identity text, p_admin bool, p_by_owner bool)
RETURNS uuid
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id uuid;
    v_next timestamptz;
BEGIN
    IF p_owner IS NULL OR memory._identity_problem() IS NOT NULL
       OR NOT (p_admin OR p_owner = p_identity) THEN
        RETURN NULL;
    END IF;
    INSERT INTO memory.chat_metadata (chat_id, owner) VALUES (p_chat, p_owner)
    ON CONFLICT (chat_id) DO NOTHING;
    INSERT INTO memory.chat_context_queue (chat_id, new_context_snippet, trigger_source,
                                           enqueued_by, next_attempt_at)
    SELECT m.chat_id, p_text, p_source, coalesce(p_identity, m.owner), greatest(now(), m.retry_at)
      FROM memory.chat_metadata m
     WHERE m.chat_id = p_chat AND (m.owner = p_owner OR (p_admin AND NOT p_by_owner))
       FOR KEY SHARE OF m
    RETURNING id, next_attempt_at INTO v_id, v_next;
    IF v_id IS NULL THEN
        RETURN NULL;
    END IF;
    IF memory._debounce_ms() > 0 THEN
        PERFORM memory._debounce_chat(p_chat, v_next);
    ELSE
        UPDATE memory.chat_metadata m SET due_at = v_next
         WHERE m.chat_id = p_chat AND m.due_at IS NULL;
    END IF;
    INSERT INTO memory.audit_log (identity, role, action, chat_id, queue_id, detail)
    VALUES (coalesce(p_identity, '(none)'), memory._invoker(), 'enqueue', p_chat, v_id,
            p_source);
    RETURN v_id;
END
$$;

-- Audit what a capture did not take: rows without a text or a valid chat id (one row per
-- statement), and rows refused per chat (another owner's chat, or not the inserter's row).
CREATE FUNCTION memory._capture_refused(p_source text, p_identity text, p_rows int,
                                        p_skipped int, p_denied text[])
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_skipped > 0 THEN
        PERFORM memory._audit('watch_skipped', NULL, NULL,
            format('%s: %s of %s rows without a text or a valid chat id', p_source, p_skipped,
                   p_rows));
    END IF;
    INSERT INTO memory.audit_log (identity, role, action, chat_id, detail)
    SELECT coalesce(p_identity, '(none)'), memory._invoker(), 'denied:watch', d.chat,
           format('%s: %s rows not captured (another owner''s chat, or not the inserting '
                  'identity''s row)', p_source, count(*))
      FROM unnest(p_denied) AS d(chat)
     GROUP BY d.chat;
END
$$;

-- What watch() checks: an admin, with the rights the trigger would give it (TRIGGER on the table,
-- SELECT on each named column: watching copies them into memory, which admins read), a table
-- (not a view, not memory's own), columns that exist.
CREATE FUNCTION memory._check_watch(p_source regclass, p_columns name[])
RETURNS void
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_kind "char";
    v_col name;
BEGIN
    PERFORM memory._require_admin('memory.watch()');
    IF p_source IS NULL OR p_columns[1] IS NULL OR p_columns[2] IS NULL THEN
        RAISE EXCEPTION 'table, chat column and text column must not be null' USING ERRCODE = '22023';
    END IF;
    SELECT c.relkind INTO v_kind FROM pg_class c WHERE c.oid = p_source;
    IF v_kind IS NULL OR v_kind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '"%" is not a table', p_source USING ERRCODE = '42809';
    END IF;
    IF (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = p_source) = 'memory' THEN
        RAISE EXCEPTION 'memory_ext''s own tables cannot be watched' USING ERRCODE = '22023';
    END IF;
    IF NOT has_table_privilege(memory._invoker(), p_source, 'TRIGGER') THEN
        RAISE EXCEPTION 'permission denied to watch "%": TRIGGER privilege on it needed', p_source
            USING ERRCODE = '42501';
    END IF;
    FOREACH v_col IN ARRAY p_columns LOOP
        CONTINUE WHEN v_col IS NULL;
        IF NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = p_source
                          AND a.attname = v_col AND a.attnum > 0 AND NOT a.attisdropped) THEN
            RAISE EXCEPTION 'column "%" of "%" does not exist', v_col, p_source
                USING ERRCODE = '42703';
        END IF;
        IF NOT has_column_privilege(memory._invoker(), p_source, v_col, 'SELECT') THEN
            RAISE EXCEPTION 'permission denied to watch "%": SELECT on column "%" needed',
                p_source, v_col USING ERRCODE = '42501';
        END IF;
    END LOOP;
    IF p_columns[1] = p_columns[2] THEN
        RAISE EXCEPTION 'the chat and text columns must differ' USING ERRCODE = '22023';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = p_source
                  AND t.tgname = 'memory_ext_capture'
                  AND t.tgfoid <> 'memory._capture()'::regprocedure) THEN
        RAISE EXCEPTION '"%" has a trigger memory_ext_capture of its own', p_source
            USING ERRCODE = '42710';
    END IF;
END
$$;

-- Watch a table: every row inserted into it becomes a snippet of its chat. Watching a watched
-- table again replaces its columns.
CREATE FUNCTION memory.watch(p_source regclass, p_chat_column name, p_text_column name,
                             p_owner_column name DEFAULT NULL, p_role_column name DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM memory._check_watch(p_source,
        ARRAY[p_chat_column, p_text_column, p_owner_column, p_role_column]);
    EXECUTE format('CREATE OR REPLACE TRIGGER memory_ext_capture AFTER INSERT ON %s '
                   'REFERENCING NEW TABLE AS memory_ext_new_rows FOR EACH STATEMENT '
                   'EXECUTE FUNCTION memory._capture(%L, %L, %L, %L)',
                   p_source, p_chat_column, p_text_column,
                   coalesce(p_owner_column, ''), coalesce(p_role_column, ''));
    PERFORM memory._audit('watch', NULL, NULL,
        format('%s (chat %s, text %s, owner %s, role %s)', p_source, p_chat_column,
               p_text_column, coalesce(p_owner_column, '-'), coalesce(p_role_column, '-')));
END
$$;

-- Stop watching a table (22023 when it is not watched). Snippets already enqueued stay.
CREATE FUNCTION memory.unwatch(p_source regclass)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM memory._require_admin('memory.unwatch()');
    IF NOT EXISTS (SELECT 1 FROM memory.watched w WHERE w.source = p_source) THEN
        RAISE EXCEPTION '"%" is not watched', coalesce(p_source::text, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    IF NOT has_table_privilege(memory._invoker(), p_source, 'TRIGGER') THEN
        RAISE EXCEPTION 'permission denied to unwatch "%": TRIGGER privilege on it needed',
            p_source USING ERRCODE = '42501';
    END IF;
    EXECUTE format('DROP TRIGGER memory_ext_capture ON %s', p_source);
    PERFORM memory._audit('unwatch', NULL, NULL, p_source::text);
END
$$;

-- Before DROP EXTENSION (from the utility hook, as the extension's owner): the capture triggers
-- depend on memory._capture(), so they would block the drop or, with CASCADE, go with it anyway.
CREATE FUNCTION memory._unwatch_all()
RETURNS int
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_source regclass;
    v_n int := 0;
BEGIN
    FOR v_source IN SELECT w.source FROM memory.watched w LOOP
        EXECUTE format('DROP TRIGGER memory_ext_capture ON %s', v_source);
        v_n := v_n + 1;
    END LOOP;
    RETURN v_n;
END
$$;

-- What is watched, read from the triggers themselves.
CREATE VIEW memory.watched AS
SELECT t.tgrelid::regclass AS source,
       a[1]::name AS chat_column,
       a[2]::name AS text_column,
       nullif(a[3], '')::name AS owner_column,
       nullif(a[4], '')::name AS role_column,
       t.tgenabled <> 'D' AS enabled
  FROM pg_catalog.pg_trigger t, LATERAL (SELECT memory._trigger_args(t.tgargs) AS a) args
 WHERE t.tgfoid = 'memory._capture()'::pg_catalog.regprocedure;
