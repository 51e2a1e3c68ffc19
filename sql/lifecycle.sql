-- Correcting and erasing memory: roll a chat back to an earlier version, erase an owner.

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

-- Make a chat's memory what it was at p_version again, as a new version: history keeps every
-- version, and the new one names the version it restored (restored_version, no snippets). A
-- summarization in flight is called off (its snippets are pending again and will be applied on
-- top of the restored memory, in order); pending snippets stay pending. Returns the new version.
CREATE FUNCTION memory.rollback(p_chat_id text, p_version bigint)
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    c memory.chat_metadata%ROWTYPE;
    m record;
    r record;
    v_tokens int;
BEGIN
    PERFORM memory._owned_chat(p_chat_id, 'rollback');
    PERFORM memory._take_rate_token(memory.current_identity());
    -- Locked like the worker's finish: a summarization in flight cannot apply after this.
    SELECT * INTO c FROM memory.chat_metadata x WHERE x.chat_id = p_chat_id FOR UPDATE;
    IF p_version IS NULL OR p_version < 0 OR p_version >= c.version THEN
        RAISE EXCEPTION 'version must be an earlier version of chat "%" (0 to %), got %',
            p_chat_id, c.version - 1, coalesce(p_version::text, 'NULL') USING ERRCODE = '22023';
    END IF;
    SELECT * INTO m FROM memory._memory_at(p_chat_id, p_version);
    IF NOT FOUND THEN
        RAISE EXCEPTION 'version % of chat "%" is no longer kept (memory_ext.history_versions)',
            p_version, p_chat_id USING ERRCODE = '22023';
    END IF;
    IF c.lease_token IS NOT NULL THEN
        PERFORM memory._return_claimed(p_chat_id, false, false, NULL, NULL, 1, now());
    END IF;
    SELECT x.* INTO r FROM memory._render_context(m.user_confirmed, m.llm_inferred,
                                                  m.general_summary, NULL, NULL) x;
    v_tokens := memory._count_memory(m.user_confirmed, m.llm_inferred, m.general_summary);
    UPDATE memory.chat_metadata x
       SET user_confirmed = m.user_confirmed, llm_inferred = m.llm_inferred,
           general_summary = m.general_summary, token_count = v_tokens,
           needs_new_chat = v_tokens > memory._token_limit(), version = c.version + 1,
           last_updated = now(), context_text = r.context, context_tokens = r.token_count
     WHERE x.chat_id = p_chat_id;
    INSERT INTO memory.chat_memory_history (chat_id, version, queue_ids, old_user_confirmed,
        old_llm_inferred, old_general_summary, user_confirmed, llm_inferred, general_summary,
        token_count, summarizer, restored_version)
    VALUES (p_chat_id, c.version + 1, '{}', c.user_confirmed, c.llm_inferred, c.general_summary,
        m.user_confirmed, m.llm_inferred, m.general_summary, v_tokens, 'rollback', p_version);
    PERFORM memory._audit('rollback', p_chat_id, NULL,
        format('version %s restored as version %s', p_version, c.version + 1));
    RETURN c.version + 1;
END
$$;

-- Erase everything of one identity (admins): its chats with their snippets and history (and
-- so what its usage cost per version), and its scheduling state. One audit row records the
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
    WITH q AS (DELETE FROM memory.chat_context_queue q WHERE q.chat_id = ANY (v_chats)
               RETURNING 1)
    SELECT count(*) INTO v_snippets FROM q;
    WITH h AS (DELETE FROM memory.chat_memory_history h WHERE h.chat_id = ANY (v_chats)
               RETURNING 1)
    SELECT count(*) INTO v_versions FROM h;
    DELETE FROM memory.chat_metadata m WHERE m.chat_id = ANY (v_chats);
    DELETE FROM memory.owner_turns t WHERE t.owner = p_owner;
    PERFORM memory._audit('forget_owner', NULL, NULL,
        format('%s: %s chats, %s snippets, %s versions erased', p_owner,
               cardinality(v_chats), v_snippets, v_versions));
    RETURN cardinality(v_chats);
END
$$;
