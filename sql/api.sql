-- The public SQL API. Names and signatures are a contract (README, tests, clients).
-- Errors: 22023 invalid input, P0002 unknown chat or queue id -- or one of another identity, which
-- must read as unknown (no existence oracle); 42501 only from create_chat/enqueue into another
-- identity's chat (a global chat namespace cannot hide that: chat ids should be unguessable) and
-- admin-only functions; PGRST (HTTP 429 through PostgREST) over the rate limit.
--
-- Functions that touch the tables are SECURITY DEFINER (callers get no table privileges) with a
-- fixed search_path and schema-qualified names, so a caller's objects cannot hijack them. Inside
-- them current_user is the definer: the caller is memory._invoker(), and identity comes from it
-- or the JWT.

-- The role the caller acts as: SET ROLE's role (PostgREST's SET LOCAL ROLE from the JWT), else
-- the session user. Not current_user, which is the definer inside SECURITY DEFINER functions.
--
-- _invoker() and _jwt_sub() are SQL-standard bodies (BEGIN ATOMIC / RETURN): parsed and bound to
-- their objects at CREATE time, so the caller's search_path cannot redirect them, and they need
-- no SET clause (which would cost a search_path switch on every call).
CREATE FUNCTION memory._invoker()
RETURNS name
LANGUAGE sql STABLE PARALLEL SAFE
RETURN coalesce(nullif(pg_catalog.current_setting('role'), 'none'), session_user)::name;

-- The JWT `sub` claim PostgREST/Supabase put in request.jwt.claims (trimmed), or NULL.
CREATE FUNCTION memory._jwt_sub()
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
RETURN nullif(pg_catalog.btrim(
    nullif(pg_catalog.current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub'), '');

-- The caller, in one of two namespaces that never collide: the JWT `sub` claim as it is, or
-- `role:<name>` for the invoking role (a direct connection, or a JWT without a usable sub). A
-- `sub` that itself starts with `role:` is no identity (NULL): it could pose as a role.
-- memory.current_identity() computes it in Rust (src/identity.rs) from the two functions above:
-- as an inlined expression, plpgsql compiled it anew in every transaction of every hot path.

-- Admins see and act on every chat: superusers, the extension owner, members of
-- memory_ext.admin_role (default service_role) when it exists, and members of roles given
-- memory.grant_admin(). memory._is_admin() (Rust, src/identity.rs) answers superusers and the
-- admin role's members itself and asks this for the rest. Definer rights so RLS policies can call
-- it without table grants. The setting is read through the library (_admin_role), never with
-- current_setting(): without shared_preload_libraries an unloaded library's setting is a
-- placeholder any role may SET.
CREATE FUNCTION memory._is_admin_catalog()
RETURNS bool
LANGUAGE plpgsql STABLE PARALLEL SAFE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- plpgsql, not sql: its plan is kept for the session (a sql function with SET is parsed and
    -- planned on every call, which cost more than the rest of a captured insert)
    RETURN coalesce((
        SELECT r.rolsuper
            OR pg_catalog.pg_has_role(r.oid, e.extowner, 'MEMBER')
            OR EXISTS (SELECT 1 FROM pg_catalog.pg_roles a
                        WHERE a.rolname = memory._admin_role()
                          AND pg_catalog.pg_has_role(r.oid, a.oid, 'MEMBER'))
            OR EXISTS (SELECT 1 FROM memory.admin_roles g
                        WHERE pg_catalog.pg_has_role(r.oid, g.role::oid, 'MEMBER'))
          FROM pg_catalog.pg_roles r, pg_catalog.pg_extension e
         WHERE r.rolname = memory._invoker() AND e.extname = 'memory_ext'), false);
END
$$;

-- Why the caller may not create chats, or NULL. A request that carries JWT claims but no usable
-- `sub` would otherwise act as its role (every such user sharing `role:authenticated`): refused
-- unless an admin (a backend with the service role). A `sub` posing as a role is refused too.
CREATE FUNCTION memory._identity_problem()
RETURNS text
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF memory.current_identity() IS NULL THEN
        RETURN 'a JWT sub may not start with "role:"';
    END IF;
    IF memory._jwt_sub() IS NULL
       AND nullif(pg_catalog.current_setting('request.jwt.claims', true), '') IS NOT NULL
       AND NOT memory._is_admin() THEN
        RETURN 'the request''s JWT has no usable sub claim: it cannot own chats';
    END IF;
    RETURN NULL;
END
$$;

-- 42501 when the caller has no identity that may own chats (see _identity_problem).
CREATE FUNCTION memory._require_identity()
RETURNS void
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_problem text := memory._identity_problem();
BEGIN
    IF v_problem IS NOT NULL THEN
        RAISE EXCEPTION '%', v_problem USING ERRCODE = '42501';
    END IF;
END
$$;

-- Record an action in the audit log (callers are definer functions; see audit_log in schema.sql).
CREATE FUNCTION memory._audit(p_action text, p_chat_id text DEFAULT NULL,
                              p_queue_id uuid DEFAULT NULL, p_detail text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    INSERT INTO memory.audit_log (identity, role, action, chat_id, queue_id, detail)
    VALUES (coalesce(memory.current_identity(), 'role:' || memory._invoker()), memory._invoker(),
            p_action, p_chat_id, p_queue_id, p_detail);
END
$$;

-- Does the caller's identity own this chat? For RLS policies of tables without an owner column.
-- It answers only about the caller, so it tells nothing about other users' chats.
CREATE FUNCTION memory._owns_chat(p_chat_id text)
RETURNS bool
LANGUAGE plpgsql STABLE PARALLEL SAFE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM memory.chat_metadata m
                    WHERE m.chat_id = p_chat_id AND m.owner = memory.current_identity());
END
$$;

-- 42501 unless the caller is an admin.
CREATE FUNCTION memory._require_admin(p_what text)
RETURNS void
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT memory._is_admin() THEN
        RAISE EXCEPTION '% is for memory_ext admins only', p_what USING ERRCODE = '42501';
    END IF;
END
$$;

-- What is wrong with a chat id, or NULL. One rule for every function: not blank, at most 256
-- characters, no control or invisible (zero-width, bidi) characters, no surrounding whitespace,
-- and in Unicode NFC, so ids that look the same are the same id. memory._chat_id_problem() (in
-- Rust, src/chat_id.rs) answers plain printable ASCII ids itself and asks this for the rest.
-- A SQL-standard body, bound at CREATE time, so it needs no SET search_path.
CREATE FUNCTION memory._chat_id_rules(p_chat_id text)
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
RETURN CASE
    -- printable ASCII, not starting or ending with a space (and so NFC, free of control and
    -- invisible characters), at most 256 bytes. The length is not a bounded repeat in the
    -- pattern: '{0,254}' compiles into a regex 40x slower to run.
    WHEN p_chat_id OPERATOR(pg_catalog.~) '^[!-~]([ -~]*[!-~])?$'
         AND pg_catalog.octet_length(p_chat_id) <= 256 THEN NULL
    WHEN p_chat_id IS NULL OR pg_catalog.btrim(p_chat_id) = '' THEN 'must not be null or blank'
    WHEN pg_catalog.length(p_chat_id) > 256 THEN 'is longer than 256 characters'
    WHEN p_chat_id OPERATOR(pg_catalog.~)
         '[[:cntrl:]\u00AD\u200B-\u200F\u2028-\u202E\u2060-\u2064\uFEFF]|^\s|\s$'
        THEN 'must not contain control or invisible characters, nor start or end with whitespace'
    WHEN pg_catalog.getdatabaseencoding() <> 'UTF8' THEN NULL
    WHEN p_chat_id IS NOT NFC NORMALIZED THEN 'must be in Unicode normalization form NFC'
END;

CREATE FUNCTION memory._check_chat_id(p_chat_id text)
RETURNS void
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_problem text := memory._chat_id_problem(p_chat_id);
BEGIN
    IF v_problem IS NOT NULL THEN
        RAISE EXCEPTION 'chat_id %', v_problem USING ERRCODE = '22023';
    END IF;
END
$$;

-- Refuse a cross-tenant attempt: note it for the audit log (the ERROR rolls back any row this
-- transaction could write; the worker copies the note into memory.audit_log), then raise.
CREATE FUNCTION memory._refuse(p_action text, p_chat_id text, p_errcode text, p_message text)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM memory._note_denied(p_action, coalesce(p_chat_id, ''),
                                coalesce(memory.current_identity(), '(none)'), memory._invoker());
    RAISE EXCEPTION '%', p_message USING ERRCODE = p_errcode;
END
$$;

-- Look up a chat the caller may act on (for p_action). P0002 both when it does not exist and when
-- it is someone else's: the answer must not tell a caller which chat ids other users have.
CREATE FUNCTION memory._owned_chat(p_chat_id text, p_action text DEFAULT 'access')
RETURNS memory.chat_metadata
LANGUAGE plpgsql STABLE PARALLEL SAFE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    c memory.chat_metadata%ROWTYPE;
BEGIN
    PERFORM memory._check_chat_id(p_chat_id);
    SELECT * INTO c FROM memory.chat_metadata m WHERE m.chat_id = p_chat_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'chat "%" not found', p_chat_id USING ERRCODE = 'P0002';
    END IF;
    -- IS DISTINCT FROM: a caller without identity (NULL) owns nothing.
    IF c.owner IS DISTINCT FROM memory.current_identity() AND NOT memory._is_admin() THEN
        PERFORM memory._refuse(p_action, p_chat_id, 'P0002',
                               format('chat "%s" not found', p_chat_id));
    END IF;
    RETURN c;
END
$$;

-- Over memory_ext.rate_limit_per_minute: PostgREST's custom-status convention turns this into
-- HTTP 429 with Retry-After. Raised before anything is written.
CREATE FUNCTION memory._raise_rate_limited(p_wait int)
RETURNS void
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE SQLSTATE 'PGRST' USING
        MESSAGE = json_build_object('code', 'MX429',
            'message', 'rate limit exceeded',
            'details', format('at most %s writing calls per minute per identity',
                              current_setting('memory_ext.rate_limit_per_minute')),
            'hint', format('retry after %s seconds', p_wait))::text,
        DETAIL = json_build_object('status', 429,
            'headers', json_build_object('Retry-After', p_wait::text))::text;
END
$$;

-- Every writing call takes a token of the caller's bucket (admins are exempt).
CREATE FUNCTION memory._take_rate_token(p_identity text)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_wait int := memory._rate_limit(p_identity);
BEGIN
    IF v_wait > 0 AND NOT memory._is_admin() THEN
        PERFORM memory._raise_rate_limited(v_wait);
    END IF;
END
$$;

CREATE FUNCTION memory.create_chat(p_chat_id text)
RETURNS text
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_identity text := memory.current_identity();
    v_owner text;
BEGIN
    PERFORM memory._check_chat_id(p_chat_id);
    PERFORM memory._require_identity();
    PERFORM memory._take_rate_token(v_identity);
    INSERT INTO memory.chat_metadata (chat_id, owner) VALUES (p_chat_id, v_identity)
    ON CONFLICT (chat_id) DO NOTHING;
    SELECT m.owner INTO v_owner FROM memory.chat_metadata m WHERE m.chat_id = p_chat_id;
    IF v_owner IS DISTINCT FROM v_identity AND NOT memory._is_admin() THEN
        PERFORM memory._refuse('create_chat', p_chat_id, '42501',
                               format('permission denied for chat "%s"', p_chat_id));
    END IF;
    PERFORM memory._audit('create_chat', p_chat_id);
    RETURN p_chat_id;
END
$$;

CREATE FUNCTION memory.enqueue(p_chat_id text, p_snippet text, p_trigger_source text DEFAULT 'api')
RETURNS TABLE (queue_id uuid, status text, estimated_completion timestamptz)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_identity text := memory.current_identity();
    v_owner text;
    v_next timestamptz;
    v_max int := memory._max_snippet_bytes();
    v_wait int;
    v_problem text;
BEGIN
    -- The hot write path: the check of _check_chat_id, without a second plpgsql call.
    v_problem := memory._chat_id_problem(p_chat_id);
    IF v_problem IS NOT NULL THEN
        RAISE EXCEPTION 'chat_id %', v_problem USING ERRCODE = '22023';
    END IF;
    IF p_snippet IS NULL OR btrim(p_snippet, E' \t\r\n') = '' THEN
        RAISE EXCEPTION 'snippet must not be null or blank' USING ERRCODE = '22023';
    END IF;
    IF octet_length(p_snippet) > v_max THEN
        RAISE EXCEPTION 'snippet is % bytes, over memory_ext.max_snippet_bytes (%)',
            octet_length(p_snippet), v_max USING ERRCODE = '22023';
    END IF;
    IF p_trigger_source IS NULL OR btrim(p_trigger_source) = '' OR length(p_trigger_source) > 64 THEN
        RAISE EXCEPTION 'trigger_source must be 1 to 64 characters' USING ERRCODE = '22023';
    END IF;
    -- Over the limit: PostgREST's custom-status convention turns this into HTTP 429 with
    -- Retry-After. Nothing is enqueued. Admins (bulk loads, the service role) are exempt; asked
    -- only when the bucket is empty, to keep the common path cheap.
    v_wait := memory._rate_limit(v_identity);
    IF v_wait > 0 AND NOT memory._is_admin() THEN
        PERFORM memory._raise_rate_limited(v_wait);
    END IF;

    -- Common case, one statement: the chat exists and is the caller's. A chat in backoff holds its
    -- new snippets back too, so they stay behind the failed ones.
    -- FOR KEY SHARE locks the chat row before the row's seq is drawn: a claim (FOR UPDATE)
    -- skips the chat until this commits, so it never takes a later seq while an earlier one is
    -- still uncommitted. That is what makes seq the order snippets are applied in.
    INSERT INTO memory.chat_context_queue (chat_id, new_context_snippet, trigger_source,
                                           enqueued_by, next_attempt_at)
    SELECT m.chat_id, p_snippet, p_trigger_source, v_identity, greatest(now(), m.retry_at)
      FROM memory.chat_metadata m
     WHERE m.chat_id = p_chat_id AND m.owner = v_identity
       FOR KEY SHARE OF m
    RETURNING id, next_attempt_at INTO queue_id, v_next;
    IF NOT FOUND THEN
        -- A new chat (create it for the caller) or someone else's (refuse, unless an admin
        -- enqueues on the owner's behalf, e.g. a backend with the service role).
        PERFORM memory._require_identity();
        INSERT INTO memory.chat_metadata (chat_id, owner) VALUES (p_chat_id, v_identity)
        ON CONFLICT (chat_id) DO NOTHING;
        SELECT m.owner INTO v_owner FROM memory.chat_metadata m WHERE m.chat_id = p_chat_id;
        IF v_owner IS DISTINCT FROM v_identity AND NOT memory._is_admin() THEN
            PERFORM memory._refuse('enqueue', p_chat_id, '42501',
                                   format('permission denied for chat "%s"', p_chat_id));
        END IF;
        INSERT INTO memory.chat_context_queue (chat_id, new_context_snippet, trigger_source,
                                               enqueued_by, next_attempt_at)
        SELECT m.chat_id, p_snippet, p_trigger_source, v_identity, greatest(now(), m.retry_at)
          FROM memory.chat_metadata m WHERE m.chat_id = p_chat_id
           FOR KEY SHARE OF m
        RETURNING id, next_attempt_at INTO queue_id, v_next;
    END IF;
    -- The first enqueue into an idle chat makes it a claim candidate. Only then is the chat row
    -- written (and locked): never while it has work or is being summarized, so enqueues do not
    -- queue up behind each other or the worker. See _return_claimed for the other side.
    IF memory._debounce_ms() > 0 THEN
        v_next := memory._debounce_chat(p_chat_id, v_next);
    ELSE
        UPDATE memory.chat_metadata m SET due_at = v_next
         WHERE m.chat_id = p_chat_id AND m.due_at IS NULL;
    END IF;

    INSERT INTO memory.audit_log (identity, role, action, chat_id, queue_id)
    VALUES (v_identity, memory._invoker(), 'enqueue', p_chat_id, queue_id);
    status := 'pending_summarization';
    estimated_completion := v_next + memory._wake_at_commit();
    RETURN NEXT;
END
$$;

-- VOLATILE because it may write the audit log (memory_ext.audit_reads): call it with POST
-- through PostgREST, which runs STABLE functions in read-only transactions.
CREATE FUNCTION memory.get(p_chat_id text)
RETURNS TABLE (chat_id text, user_confirmed jsonb, llm_inferred jsonb, general_summary text,
               token_count int, needs_new_chat bool, guidance text, version bigint,
               last_updated timestamptz, pending int)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_owner text;
    v_problem text;
    v_busy bool;
    v_identity text := memory.current_identity();
BEGIN
    -- The check of _check_chat_id, without a second plpgsql call: this is the hot read path.
    v_problem := memory._chat_id_problem(p_chat_id);
    IF v_problem IS NOT NULL THEN
        RAISE EXCEPTION 'chat_id %', v_problem USING ERRCODE = '22023';
    END IF;
    -- One statement on the common path (the owner reads their chat).
    SELECT m.chat_id, m.user_confirmed, m.llm_inferred, m.general_summary, m.token_count,
           m.needs_new_chat, m.version, m.last_updated, m.owner,
           m.due_at IS NOT NULL OR m.lease_token IS NOT NULL
      INTO chat_id, user_confirmed, llm_inferred, general_summary, token_count, needs_new_chat,
           version, last_updated, v_owner, v_busy
      FROM memory.chat_metadata m WHERE m.chat_id = p_chat_id;
    -- Someone else's chat reads as missing: no existence oracle. Checked before anything else
    -- is read, so not even the time taken tells about another chat's backlog.
    IF NOT FOUND THEN
        RAISE EXCEPTION 'chat "%" not found', p_chat_id USING ERRCODE = 'P0002';
    END IF;
    IF v_owner IS DISTINCT FROM v_identity AND NOT memory._is_admin() THEN
        PERFORM memory._refuse('get', p_chat_id, 'P0002', format('chat "%s" not found', p_chat_id));
    END IF;
    -- An idle chat (not due, not leased) has no open snippet: whatever makes a snippet pending
    -- sets due_at in the same transaction (the worker finds work that way), so its queue is not
    -- read. The stress suite checks that invariant at every chaos step; the isolation specs
    -- check the paths that race for it (enqueue, retry_failed, claim and finish).
    pending := 0;
    IF v_busy THEN
        -- captured rows not yet moved into the queue are pending too
        SELECT ((SELECT count(*) FROM memory.chat_context_queue q
                  WHERE q.chat_id = p_chat_id
                    AND q.status IN ('pending_summarization', 'processing'))
                + (SELECT count(*) FROM memory.capture_inbox i WHERE i.chat_id = p_chat_id))::int
          INTO pending;
    END IF;
    IF memory._audit_reads() THEN
        PERFORM memory._audit('get', p_chat_id);
    END IF;
    IF needs_new_chat THEN
        guidance := memory._guidance(token_count);
    END IF;
    RETURN NEXT;
END
$$;

-- What get() and context() tell an agent whose chat's memory is over memory_ext.token_limit.
CREATE FUNCTION memory._guidance(p_token_count int)
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('This chat''s memory is %s tokens, over the limit of %s: start a new chat and '
                  'carry over the summary and confirmed facts.', p_token_count,
                  memory._token_limit())
$$;

-- The memory as prompt text, with get()'s ownership rules, errors and read audit. The worker
-- renders it when it applies a version (chat_metadata.context_text): that text is returned as it
-- is when it fits the budget and no guidance is due; otherwise it is rendered here.
CREATE FUNCTION memory.context(p_chat_id text, p_max_tokens int DEFAULT NULL)
RETURNS TABLE (context text, token_count int, truncated bool, version bigint, pending int,
               needs_new_chat bool)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    c memory.chat_metadata%ROWTYPE;
    v_problem text;
BEGIN
    IF p_max_tokens < 1 THEN
        RAISE EXCEPTION 'p_max_tokens must be at least 1 (or NULL for no limit), got %',
            p_max_tokens USING ERRCODE = '22023';
    END IF;
    -- _owned_chat(), inlined: its two nested plpgsql calls cost context() a tenth of its time
    v_problem := memory._chat_id_problem(p_chat_id);
    IF v_problem IS NOT NULL THEN
        RAISE EXCEPTION 'chat_id %', v_problem USING ERRCODE = '22023';
    END IF;
    SELECT * INTO c FROM memory.chat_metadata m WHERE m.chat_id = p_chat_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'chat "%" not found', p_chat_id USING ERRCODE = 'P0002';
    END IF;
    IF c.owner IS DISTINCT FROM memory.current_identity() AND NOT memory._is_admin() THEN
        PERFORM memory._refuse('context', p_chat_id, 'P0002',
                               format('chat "%s" not found', p_chat_id));
    END IF;
    pending := 0;
    IF c.due_at IS NOT NULL OR c.lease_token IS NOT NULL THEN   -- as in get()
        -- captured rows not yet moved into the queue are pending too
        SELECT ((SELECT count(*) FROM memory.chat_context_queue q
                  WHERE q.chat_id = p_chat_id
                    AND q.status IN ('pending_summarization', 'processing'))
                + (SELECT count(*) FROM memory.capture_inbox i WHERE i.chat_id = p_chat_id))::int
          INTO pending;
    END IF;
    IF memory._audit_reads() THEN
        PERFORM memory._audit('context', p_chat_id);
    END IF;
    version := c.version;
    needs_new_chat := c.needs_new_chat;
    IF c.context_text IS NOT NULL AND NOT c.needs_new_chat
       AND c.context_tokens <= coalesce(p_max_tokens, c.context_tokens) THEN
        context := c.context_text;
        token_count := c.context_tokens;
        truncated := false;
    ELSE
        SELECT r.context, r.token_count, r.truncated INTO context, token_count, truncated
          FROM memory._render_context(c.user_confirmed, c.llm_inferred, c.general_summary,
                   CASE WHEN c.needs_new_chat THEN memory._guidance(c.token_count) END,
                   p_max_tokens) r;
    END IF;
    RETURN NEXT;
END
$$;

CREATE FUNCTION memory.status(p_queue_id uuid)
RETURNS TABLE (status text, retry_count int, error_message text, created_at timestamptz,
               processed_at timestamptz)
LANGUAGE plpgsql STABLE PARALLEL SAFE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    q memory.chat_context_queue%ROWTYPE;
    v_owner text;
BEGIN
    IF p_queue_id IS NULL THEN
        RAISE EXCEPTION 'queue_id must not be null' USING ERRCODE = '22023';
    END IF;
    SELECT x.* INTO q FROM memory.chat_context_queue x WHERE x.id = p_queue_id;
    IF NOT FOUND THEN
        -- captured, not yet moved into the queue: pending
        SELECT i.id, i.chat_id, i.captured_at INTO q.id, q.chat_id, q.created_at
          FROM memory.capture_inbox i WHERE i.id = p_queue_id;
        q.status := 'pending_summarization';
        q.retry_count := 0;
    END IF;
    SELECT m.owner INTO v_owner FROM memory.chat_metadata m WHERE m.chat_id = q.chat_id;
    -- Someone else's snippet reads as missing: no existence oracle.
    IF v_owner IS NULL THEN
        RAISE EXCEPTION 'queue row % not found', p_queue_id USING ERRCODE = 'P0002';
    END IF;
    IF v_owner IS DISTINCT FROM memory.current_identity() AND NOT memory._is_admin() THEN
        PERFORM memory._refuse('status', q.chat_id, 'P0002',
                               format('queue row %s not found', p_queue_id));
    END IF;
    -- The owner is told the error's class; the full text (it may quote the provider) is for
    -- admins.
    RETURN QUERY SELECT q.status, q.retry_count,
        CASE WHEN memory._is_admin() THEN q.error_message ELSE q.error_public END,
        q.created_at, q.processed_at;
END
$$;

-- The transaction that inserted (or last changed) a queue row the caller may see, for wait(): a
-- row this very transaction enqueued can never complete while it waits. NULL for rows the caller
-- may not see.
CREATE FUNCTION memory._queue_row_xmin(p_queue_id uuid)
RETURNS bigint
LANGUAGE plpgsql STABLE PARALLEL SAFE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- queued, or captured and not yet moved into the queue
    RETURN (SELECT q.x::text::bigint
              FROM (SELECT x.xmin AS x, x.chat_id FROM memory.chat_context_queue x
                     WHERE x.id = p_queue_id
                    UNION ALL
                    SELECT i.xmin, i.chat_id FROM memory.capture_inbox i WHERE i.id = p_queue_id) q
              JOIN memory.chat_metadata m ON m.chat_id = q.chat_id
             WHERE m.owner = memory.current_identity() OR memory._is_admin()
             LIMIT 1);
END
$$;

CREATE FUNCTION memory.history(p_chat_id text)
RETURNS TABLE (version bigint, queue_ids uuid[], user_confirmed jsonb, llm_inferred jsonb,
               general_summary text, changed_at timestamptz)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    PERFORM memory._owned_chat(p_chat_id, 'history');
    IF memory._audit_reads() THEN
        PERFORM memory._audit('history', p_chat_id);
    END IF;
    RETURN QUERY SELECT h.version, h.queue_ids, h.user_confirmed, h.llm_inferred,
                        h.general_summary, h.changed_at
                   FROM memory.chat_memory_history h
                  WHERE h.chat_id = p_chat_id ORDER BY h.version;
END
$$;

-- Remove a chat's memory, history and queue rows. A summarization in flight is discarded.
CREATE FUNCTION memory.forget(p_chat_id text)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM memory._owned_chat(p_chat_id, 'forget');
    PERFORM memory._take_rate_token(memory.current_identity());
    PERFORM memory._audit('forget', p_chat_id);
    -- Lock the chat like the worker does, so a summarization in flight cannot apply after this.
    PERFORM 1 FROM memory.chat_metadata m WHERE m.chat_id = p_chat_id FOR UPDATE;
    -- its captured rows into the queue (audited as enqueued), erased with the rest: no capture
    -- into the chat is in flight while we hold it
    PERFORM memory._take_captured(ARRAY[p_chat_id]);
    DELETE FROM memory.chat_context_queue q WHERE q.chat_id = p_chat_id;
    DELETE FROM memory.chat_memory_history h WHERE h.chat_id = p_chat_id;
    DELETE FROM memory.chat_metadata m WHERE m.chat_id = p_chat_id;
END
$$;

-- Put failed snippets back in the queue with a fresh attempt budget: one chat, or (NULL) every
-- chat the caller may act on. Returns how many were re-queued.
CREATE FUNCTION memory.retry_failed(p_chat_id text DEFAULT NULL)
RETURNS int
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_n int;
    v_chats text[];
    v_identity text := memory.current_identity();
    v_admin bool := memory._is_admin();
BEGIN
    IF p_chat_id IS NOT NULL THEN
        PERFORM memory._owned_chat(p_chat_id, 'retry_failed');
    END IF;
    PERFORM memory._take_rate_token(v_identity);
    -- Re-queued snippets go to the end of their chat's queue (a new seq, their relative order
    -- kept): the chat's later snippets may already be applied. The chat rows are locked first,
    -- as enqueue does, so no claim sees a new seq before it commits, and a finish cannot mark
    -- the chat idle meanwhile (it looks for a lock-free moment). Only the chats locked are
    -- re-queued: a snippet that failed while this waited for a lock, in a chat it did not lock,
    -- stays failed (re-queued under no lock, it could be left pending in an idle chat).
    SELECT coalesce(array_agg(x.chat_id), '{}') INTO v_chats
      FROM (SELECT m.chat_id FROM memory.chat_metadata m
             WHERE (m.chat_id = p_chat_id OR p_chat_id IS NULL)
               AND (v_admin OR m.owner = v_identity)
               AND EXISTS (SELECT 1 FROM memory.chat_context_queue q
                            WHERE q.chat_id = m.chat_id AND q.status = 'failed')
             ORDER BY m.chat_id
               FOR KEY SHARE OF m) x;
    WITH requeued AS (
        SELECT x.id, nextval('memory.chat_context_queue_seq') AS seq
          FROM (SELECT q.id FROM memory.chat_context_queue q
                 WHERE q.status = 'failed' AND q.chat_id = ANY (v_chats)
                 ORDER BY q.seq) x
    )
    UPDATE memory.chat_context_queue q
       SET status = 'pending_summarization', retry_count = 0, next_attempt_at = now(),
           processed_at = NULL, seq = requeued.seq
      FROM requeued WHERE q.id = requeued.id;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    UPDATE memory.chat_metadata m SET due_at = now()
     WHERE m.due_at IS NULL AND m.chat_id = ANY (v_chats);
    IF v_n > 0 THEN
        PERFORM memory._wake_at_commit();
    END IF;
    PERFORM memory._audit('retry', p_chat_id, NULL, format('%s snippet(s) re-queued', v_n));
    RETURN v_n;
END
$$;

CREATE VIEW memory.queue_stats AS
SELECT s.status,
       count(q.id) AS count,
       CASE WHEN s.status = 'pending_summarization' THEN now() - min(q.created_at) END
           AS oldest_pending_age
  FROM unnest(ARRAY['pending_summarization', 'processing', 'complete', 'failed']) AS s(status)
  -- captured rows the worker has not moved into the queue yet are pending
  LEFT JOIN (SELECT q.id, q.status, q.created_at FROM memory.chat_context_queue q
             UNION ALL
             SELECT i.id, 'pending_summarization', i.captured_at FROM memory.capture_inbox i) q
    ON q.status = s.status
 GROUP BY s.status;

-- What memory costs: LLM requests and tokens per summarizer, all days summed (the daily figures
-- are in memory.llm_usage_daily). Failed attempts count too: a bad answer costs tokens.
CREATE VIEW memory.llm_usage AS
SELECT u.summarizer,
       min(u.day) AS since,
       sum(u.batches_applied)::bigint AS batches_applied,
       sum(u.attempts_failed)::bigint AS attempts_failed,
       sum(u.llm_requests)::bigint AS llm_requests,
       sum(u.prompt_tokens)::bigint AS prompt_tokens,
       sum(u.completion_tokens)::bigint AS completion_tokens,
       sum(u.rejected_ops)::bigint AS rejected_ops,
       sum(u.cached_prompt_tokens)::bigint AS cached_prompt_tokens,
       sum(u.cache_write_tokens)::bigint AS cache_write_tokens
  FROM memory.llm_usage_daily u
 GROUP BY u.summarizer;
