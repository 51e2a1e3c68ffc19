-- Correcting and erasing memory: roll a chat back to an earlier version, re-derive it from its
-- snippets (rebuild), erase one snippet or an owner.

-- The memory a chat had at version p_version (0: the empty memory before anything was applied),
-- from its history: the version's own row, or the next version's "old" columns. No row when that
-- version is no longer kept (memory_ext.history_versions).
CREATE FUNCTION memory._memory_at(p_chat_id text, p_version bigint,
                                  OUT user_confirmed jsonb, OUT llm_inferred jsonb,
                                  OUT general_summary text)
RETURNS SETOF record
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT '{}'::jsonb, '{}'::jsonb, '' WHERE p_version = 0
    UNION ALL
    (SELECT x.user_confirmed, x.llm_inferred, x.general_summary
       FROM (SELECT h.user_confirmed, h.llm_inferred, h.general_summary, 0 AS pick
               FROM memory.chat_memory_history h
              WHERE h.chat_id = p_chat_id AND h.version = p_version
             UNION ALL
             SELECT h.old_user_confirmed, h.old_llm_inferred, h.old_general_summary, 1
               FROM memory.chat_memory_history h
              WHERE h.chat_id = p_chat_id AND h.version = p_version + 1) x
      WHERE p_version > 0
      ORDER BY x.pick LIMIT 1)
$$;

-- Make p_memory the chat's memory as a new version, rendered and counted as the worker would,
-- with a history row (no snippets for a rollback, the re-derived ones for a rebuild). The caller
-- holds the chat row lock. Returns the new version.
CREATE FUNCTION memory._set_memory(p_chat_id text, p_confirmed jsonb, p_inferred jsonb,
                                   p_summary text, p_summarizer text, p_queue_ids uuid[],
                                   p_restored_version bigint, p_usage jsonb)
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    c memory.chat_metadata%ROWTYPE;
    r record;
    v_tokens int := memory._count_memory(p_confirmed, p_inferred, p_summary);
BEGIN
    SELECT * INTO c FROM memory.chat_metadata x WHERE x.chat_id = p_chat_id;
    SELECT x.* INTO r FROM memory._render_context(p_confirmed, p_inferred, p_summary, NULL, NULL) x;
    UPDATE memory.chat_metadata x
       SET user_confirmed = p_confirmed, llm_inferred = p_inferred, general_summary = p_summary,
           token_count = v_tokens, needs_new_chat = v_tokens > memory._token_limit(),
           version = c.version + 1, last_updated = now(), context_text = r.context,
           context_tokens = r.token_count, rebuild = NULL
     WHERE x.chat_id = p_chat_id;
    INSERT INTO memory.chat_memory_history (chat_id, version, queue_ids, old_user_confirmed,
        old_llm_inferred, old_general_summary, user_confirmed, llm_inferred, general_summary,
        token_count, summarizer, restored_version, rebuilt, llm_requests, prompt_tokens,
        completion_tokens, rejected_ops, cached_prompt_tokens, cache_write_tokens)
    VALUES (p_chat_id, c.version + 1, p_queue_ids, c.user_confirmed, c.llm_inferred,
        c.general_summary, p_confirmed, p_inferred, p_summary, v_tokens, p_summarizer,
        p_restored_version, p_restored_version IS NULL,
        coalesce((p_usage ->> 'llm_requests')::int, 0),
        coalesce((p_usage ->> 'prompt_tokens')::bigint, 0),
        coalesce((p_usage ->> 'completion_tokens')::bigint, 0),
        coalesce((p_usage ->> 'rejected_ops')::int, 0),
        coalesce((p_usage ->> 'cached_prompt_tokens')::bigint, 0),
        coalesce((p_usage ->> 'cache_write_tokens')::bigint, 0));
    RETURN c.version + 1;
END
$$;

-- Two usage objects ({llm_requests, prompt_tokens, ...}) added up, key by key.
CREATE FUNCTION memory._add_usage(p_a jsonb, p_b jsonb)
RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(jsonb_object_agg(k, coalesce((p_a ->> k)::bigint, 0)
                                        + coalesce((p_b ->> k)::bigint, 0)), '{}')
      FROM (SELECT jsonb_object_keys(coalesce(p_a, '{}')) UNION
            SELECT jsonb_object_keys(coalesce(p_b, '{}'))) AS x(k)
$$;

-- Make a chat's memory what it was at p_version again, as a new version: history keeps every
-- version, and the new one names the version it restored (restored_version, no snippets). A
-- summarization in flight is called off (its snippets are pending again and will be applied on
-- top of the restored memory, in order); pending snippets stay pending. Refused during a rebuild
-- (its snippets are already being applied again). Returns the new version.
CREATE FUNCTION memory.rollback(p_chat_id text, p_version bigint)
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    c memory.chat_metadata%ROWTYPE;
    m record;
    v_new bigint;
BEGIN
    PERFORM memory._owned_chat(p_chat_id, 'rollback');
    PERFORM memory._take_rate_token(memory.current_identity());
    -- Locked like the worker's finish: a summarization in flight cannot apply after this.
    SELECT * INTO c FROM memory.chat_metadata x WHERE x.chat_id = p_chat_id FOR UPDATE;
    IF p_version IS NULL OR p_version < 0 OR p_version >= c.version THEN
        RAISE EXCEPTION 'version must be an earlier version of chat "%" (0 to %), got %',
            p_chat_id, c.version - 1, coalesce(p_version::text, 'NULL') USING ERRCODE = '22023';
    END IF;
    IF c.rebuild IS NOT NULL THEN
        RAISE EXCEPTION 'chat "%" is being rebuilt: wait until its memory is applied', p_chat_id
            USING ERRCODE = '55000';
    END IF;
    SELECT * INTO m FROM memory._memory_at(p_chat_id, p_version);
    IF NOT FOUND THEN
        RAISE EXCEPTION 'version % of chat "%" is no longer kept (memory_ext.history_versions)',
            p_version, p_chat_id USING ERRCODE = '22023';
    END IF;
    IF c.lease_token IS NOT NULL THEN
        PERFORM memory._return_claimed(p_chat_id, false, false, NULL, NULL, 1, now());
    END IF;
    v_new := memory._set_memory(p_chat_id, m.user_confirmed, m.llm_inferred, m.general_summary,
                                'rollback', '{}', p_version, NULL);
    PERFORM memory._audit('rollback', p_chat_id, NULL,
        format('version %s restored as version %s', p_version, v_new));
    RETURN v_new;
END
$$;

-- During a rebuild: once no snippet up to its last one is pending or in flight, the rebuilt memory
-- becomes the chat's, as one version. The caller holds the chat row lock. Returns whether it was
-- applied. A rebuild() some of whose snippets failed to be summarized again (a bad model or key)
-- is called off instead: the memory stays as it was, its snippets stay applied (complete), newer
-- ones that went into the rebuilt memory only are pending again, and the audit log says why.
-- forget_snippet()'s rebuild is applied regardless: the old memory held the erased snippet, and
-- the failed ones are failed (retry_failed() applies them again, at the end).
CREATE FUNCTION memory._settle_rebuild(p_chat_id text)
RETURNS bool
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    b jsonb;
    v_reset uuid[];
    v_failed int;
BEGIN
    SELECT m.rebuild INTO b FROM memory.chat_metadata m WHERE m.chat_id = p_chat_id;
    IF b IS NULL OR EXISTS (SELECT 1 FROM memory.chat_context_queue q
                             WHERE q.chat_id = p_chat_id
                               AND q.status IN ('pending_summarization', 'processing')
                               AND q.seq <= (b ->> 'upto')::bigint) THEN
        RETURN false;
    END IF;
    v_reset := ARRAY(SELECT jsonb_array_elements_text(b -> 'reset'))::uuid[];
    IF (b ->> 'keep_on_failure')::bool THEN
        UPDATE memory.chat_context_queue q SET status = 'complete', processed_at = now()
         WHERE q.id = ANY (v_reset) AND q.status = 'failed';
        GET DIAGNOSTICS v_failed = ROW_COUNT;
        IF v_failed > 0 THEN
            UPDATE memory.chat_context_queue q
               SET status = 'pending_summarization', processed_at = NULL, next_attempt_at = now()
             WHERE q.chat_id = p_chat_id AND q.status = 'complete'
               AND q.id = ANY (ARRAY(SELECT jsonb_array_elements_text(b -> 'ids'))::uuid[])
               AND NOT (q.id = ANY (v_reset));
            UPDATE memory.chat_metadata m
               SET rebuild = NULL,
                   due_at = CASE WHEN FOUND AND m.lease_token IS NULL THEN now() ELSE m.due_at END
             WHERE m.chat_id = p_chat_id;
            PERFORM memory._audit('rebuild_failed', p_chat_id, NULL,
                format('%s snippet(s) could not be summarized again; the memory is unchanged',
                       v_failed));
            RETURN false;
        END IF;
    END IF;
    -- forget_snippet()'s: a once-applied snippet that failed now stays out, and says so
    UPDATE memory.chat_context_queue q SET applied_before = true
     WHERE q.id = ANY (v_reset) AND q.status = 'failed';
    PERFORM memory._set_memory(p_chat_id, b -> 'user_confirmed', b -> 'llm_inferred',
        b ->> 'general_summary', b ->> 'summarizer',
        ARRAY(SELECT jsonb_array_elements_text(b -> 'ids'))::uuid[], NULL, b -> 'usage');
    RETURN true;
END
$$;

-- Start re-deriving a chat's memory from the empty one (the caller holds the chat FOR UPDATE):
-- a summarization in flight is called off, and every applied snippet is pending again, before
-- any newer one (seq order, as they were applied). The worker summarizes them onto the rebuilt
-- memory, which replaces the chat's once the last is settled (_settle_rebuild); until then
-- agents read the memory as it was. p_keep_on_failure: call it off if a snippet fails (rebuild()).
-- Returns the snippet to wait() for (NULL: nothing to re-summarize; the empty memory is applied
-- at once). Refused (55000) when retention deleted an applied snippet: the memory could not be
-- re-derived.
CREATE FUNCTION memory._start_rebuild(p_chat_id text, p_keep_on_failure bool)
RETURNS uuid
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    c memory.chat_metadata%ROWTYPE;
    v_upto bigint;
    v_reset jsonb;
BEGIN
    SELECT * INTO c FROM memory.chat_metadata x WHERE x.chat_id = p_chat_id;
    IF c.pruned_at IS NOT NULL THEN
        RAISE EXCEPTION 'the memory of chat "%" cannot be re-derived: retention deleted snippets '
            'it depends on (at %)', p_chat_id, c.pruned_at
            USING ERRCODE = '55000',
                  HINT = 'memory_ext.keep_applied_snippets keeps them; memory.forget() erases '
                         'the whole chat';
    END IF;
    IF c.lease_token IS NOT NULL THEN
        PERFORM memory._return_claimed(p_chat_id, false, false, NULL, NULL, 1, now());
    END IF;
    WITH reset AS (
        UPDATE memory.chat_context_queue q
           SET status = 'pending_summarization', processed_at = NULL, retry_count = 0,
               error_message = NULL, error_public = NULL, next_attempt_at = now()
         WHERE q.chat_id = p_chat_id AND q.status = 'complete'
        RETURNING q.id, q.seq
    )
    SELECT greatest(max(reset.seq), (c.rebuild ->> 'upto')::bigint),
           coalesce(c.rebuild -> 'reset', '[]') || coalesce(jsonb_agg(reset.id), '[]')
      INTO v_upto, v_reset FROM reset;
    UPDATE memory.chat_metadata x
       SET rebuild = jsonb_build_object('upto', coalesce(v_upto, 0), 'user_confirmed', '{}'::jsonb,
               'llm_inferred', '{}'::jsonb, 'general_summary', '', 'ids', '[]'::jsonb,
               'usage', '{}'::jsonb, 'summarizer', 'rebuild', 'reset', v_reset,
               'keep_on_failure', p_keep_on_failure AND coalesce((c.rebuild ->> 'keep_on_failure')::bool, true)),
           due_at = CASE WHEN v_upto IS NULL THEN x.due_at ELSE now() END, retry_at = NULL
     WHERE x.chat_id = p_chat_id;
    IF memory._settle_rebuild(p_chat_id) THEN
        RETURN NULL;
    END IF;
    PERFORM memory._wake_at_commit();
    -- the last snippet to settle: claims take a chat's snippets in seq order
    RETURN (SELECT q.id FROM memory.chat_context_queue q
             WHERE q.chat_id = p_chat_id AND q.seq <= v_upto
               AND q.status IN ('pending_summarization', 'processing')
             ORDER BY q.seq DESC LIMIT 1);
END
$$;

-- Re-summarize a chat's applied snippets, in order, from the empty memory, through the current
-- summarizer and settings (after a model or instructions change), through the worker: the result
-- is applied as one new version (history: rebuilt, the snippets in queue_ids). A rebuild undoes
-- rollbacks (it re-derives from every applied snippet); one started during a rebuild starts it
-- again. Returns the snippet to memory.wait() for: once it is settled the rebuilt memory is the
-- chat's (NULL: nothing to re-summarize, the empty memory was applied at once).
CREATE FUNCTION memory.rebuild(p_chat_id text)
RETURNS uuid
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_wait uuid;
BEGIN
    PERFORM memory._owned_chat(p_chat_id, 'rebuild');
    PERFORM memory._take_rate_token(memory.current_identity());
    -- Locked like the worker's finish and enqueue's KEY SHARE: nothing applies or draws a seq
    -- while the snippets are put back.
    PERFORM 1 FROM memory.chat_metadata x WHERE x.chat_id = p_chat_id FOR UPDATE;
    v_wait := memory._start_rebuild(p_chat_id, true);
    PERFORM memory._audit('rebuild', p_chat_id, v_wait);
    RETURN v_wait;
END
$$;

-- Erase one snippet: its row is deleted and, when it was already applied, the chat's memory is
-- re-derived without it (as rebuild() does) and every history version that may hold what was
-- derived from it is deleted (from the first version that applied it on; all of them when that
-- version is no longer kept). The memory agents read is emptied at once (a new version with no
-- history row), so nothing derived from the snippet is readable while the rebuild runs. A
-- pending or failed snippet is simply deleted (unless it was applied once and failed when the
-- chat was re-derived: then it is erased as an applied one); one being summarized is called off
-- first.
-- Refused (55000, changing nothing) when the memory cannot be re-derived (retention deleted
-- snippets it depends on): memory.forget() erases the whole chat. Returns the snippet to
-- memory.wait() for until the re-derived memory is applied (NULL: none).
CREATE FUNCTION memory.forget_snippet(p_queue_id uuid)
RETURNS uuid
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_chat text;
    v_status text;
    v_applied bool;
    v_from bigint;
    v_rebuilt bool;
    v_wait uuid;
BEGIN
    IF p_queue_id IS NULL THEN
        RAISE EXCEPTION 'queue_id must not be null' USING ERRCODE = '22023';
    END IF;
    SELECT q.chat_id INTO v_chat FROM memory.chat_context_queue q WHERE q.id = p_queue_id;
    IF NOT FOUND THEN
        -- captured, not yet moved into the queue (moved below, under the chat's lock); or moved
        -- between the two looks (the move is one transaction: a third look finds it)
        SELECT i.chat_id INTO v_chat FROM memory.capture_inbox i WHERE i.id = p_queue_id;
        IF NOT FOUND THEN
            SELECT q.chat_id INTO v_chat FROM memory.chat_context_queue q WHERE q.id = p_queue_id;
        END IF;
    END IF;
    IF v_chat IS NULL THEN
        RAISE EXCEPTION 'queue row % not found', p_queue_id USING ERRCODE = 'P0002';
    END IF;
    -- Someone else's snippet reads as missing, like status().
    IF NOT (memory._owns_chat(v_chat) OR memory._is_admin()) THEN
        PERFORM memory._refuse('forget_snippet', v_chat, 'P0002',
                               format('queue row %s not found', p_queue_id));
    END IF;
    PERFORM memory._take_rate_token(memory.current_identity());
    PERFORM 1 FROM memory.chat_metadata x WHERE x.chat_id = v_chat FOR UPDATE;
    PERFORM memory._take_captured(ARRAY[v_chat]);
    -- Read again under the lock: a finish may have applied it meanwhile.
    SELECT q.status, q.applied_before INTO v_status, v_applied
      FROM memory.chat_context_queue q WHERE q.id = p_queue_id;
    -- The first kept version that applied it, if any.
    SELECT h.version, h.rebuilt INTO v_from, v_rebuilt FROM memory.chat_memory_history h
     WHERE h.chat_id = v_chat AND h.queue_ids @> ARRAY[p_queue_id]
     ORDER BY h.version LIMIT 1;
    -- Applied: complete, or put back by a rebuild in progress, or in a version history still
    -- holds, or failed after it was applied (a snippet a rebuild could not apply again).
    v_applied := v_applied OR v_status = 'complete'
        OR (SELECT x.rebuild -> 'reset' FROM memory.chat_metadata x WHERE x.chat_id = v_chat)
           @> to_jsonb(p_queue_id::text)
        OR v_from IS NOT NULL;
    IF v_status = 'processing' THEN
        PERFORM memory._return_claimed(v_chat, false, false, NULL, NULL, 1, now());
    END IF;
    IF v_applied THEN
        -- A rebuilt version is not the first to hold its effects: earlier kept ones may too.
        DELETE FROM memory.chat_memory_history h
         WHERE h.chat_id = v_chat AND (v_from IS NULL OR v_rebuilt OR h.version >= v_from);
        DELETE FROM memory.chat_context_queue q WHERE q.id = p_queue_id;
        -- refuses (so the whole call changes nothing) when the memory cannot be re-derived
        v_wait := memory._start_rebuild(v_chat, false);
        UPDATE memory.chat_metadata x
           SET user_confirmed = '{}', llm_inferred = '{}', general_summary = '', token_count = 0,
               needs_new_chat = false, context_text = NULL, context_tokens = NULL,
               version = x.version + 1, last_updated = now()
         WHERE x.chat_id = v_chat AND v_wait IS NOT NULL;
    ELSE
        DELETE FROM memory.chat_context_queue q WHERE q.id = p_queue_id;
    END IF;
    PERFORM memory._audit('forget_snippet', v_chat, p_queue_id,
                          CASE WHEN v_applied THEN 'applied' ELSE v_status END);
    RETURN v_wait;
END
$$;

-- Erase everything of one identity (admins): its chats with their snippets and history (and
-- so what its usage cost per version), its daily usage and budget, and its scheduling state. One audit row records the
-- erasure, with counts and no content. Returns the number of chats erased.
CREATE FUNCTION memory.forget_owner(p_owner text)
RETURNS int
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_chats text[];
    v_snippets bigint;
    v_versions bigint;
BEGIN
    PERFORM memory._require_admin('memory.forget_owner()');
    IF p_owner IS NULL OR btrim(p_owner) = '' THEN
        RAISE EXCEPTION 'owner must not be null or blank' USING ERRCODE = '22023';
    END IF;
    -- Locked like forget(): no summarization in flight applies after this.
    SELECT coalesce(array_agg(m.chat_id ORDER BY m.chat_id), '{}') INTO v_chats
      FROM (SELECT x.chat_id FROM memory.chat_metadata x WHERE x.owner = p_owner
             ORDER BY x.chat_id FOR UPDATE) m;
    -- captured rows into the queue (audited as enqueued), erased with the rest
    PERFORM memory._take_captured(v_chats);
    WITH q AS (DELETE FROM memory.chat_context_queue q WHERE q.chat_id = ANY (v_chats)
               RETURNING 1)
    SELECT count(*) INTO v_snippets FROM q;
    WITH h AS (DELETE FROM memory.chat_memory_history h WHERE h.chat_id = ANY (v_chats)
               RETURNING 1)
    SELECT count(*) INTO v_versions FROM h;
    DELETE FROM memory.chat_metadata m WHERE m.chat_id = ANY (v_chats);
    DELETE FROM memory.owner_turns t WHERE t.owner = p_owner;
    DELETE FROM memory.owner_usage_daily u WHERE u.owner = p_owner;
    DELETE FROM memory.owner_budgets b WHERE b.owner = p_owner;
    PERFORM memory._audit('forget_owner', NULL, NULL,
        format('%s: %s chats, %s snippets, %s versions erased', p_owner,
               cardinality(v_chats), v_snippets, v_versions));
    RETURN cardinality(v_chats);
END
$$;

REVOKE ALL ON FUNCTION memory._set_memory(text, jsonb, jsonb, text, text, uuid[], bigint, jsonb),
    memory._settle_rebuild(text), memory._start_rebuild(text, bool) FROM PUBLIC;
