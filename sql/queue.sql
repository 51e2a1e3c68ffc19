-- Claiming and applying work. Called by the worker (and process_pending) from Rust, which owns
-- summarizing and the merge rules; these functions own every row movement. Internal: no caller
-- but the extension's own code should run them.

-- Lease up to p_max_chats chats that have due work and are neither leased nor backing off, and
-- mark up to p_max_snippets of each one's pending snippets 'processing' under that lease.
-- Returns each leased chat's current memory and its snippets in enqueue order. Chats in p_exclude
-- are skipped (process_pending attempts a chat at most once per call).
CREATE FUNCTION memory._claim(p_max_chats int, p_max_snippets int, p_lease_seconds int,
                              p_exclude text[] DEFAULT '{}')
RETURNS TABLE (chat_id text, lease_token uuid, version bigint, user_confirmed jsonb,
               llm_inferred jsonb, general_summary text, snippets jsonb)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_chats text[];
    v_ids uuid[];
    v_with_rows text[];
BEGIN
    -- Dynamic SQL throughout: a plan cached while the queue was small must never be reused at
    -- millions of rows (a generic nested-loop plan once made one claim take 45 s at 100k rows).
    -- Candidates come from the due index in order; a chat appears once however many rows it has.
    EXECUTE $q$
        WITH cand AS (
            SELECT DISTINCT d.chat_id
            FROM (SELECT q.chat_id FROM memory.chat_context_queue q
                  WHERE q.status = 'pending_summarization' AND q.next_attempt_at <= now()
                  ORDER BY q.next_attempt_at, q.seq
                  LIMIT $1 * 8) d
        ), locked AS (
            SELECT c.chat_id FROM memory.chat_metadata c JOIN cand ON cand.chat_id = c.chat_id
            WHERE (c.lease_until IS NULL OR c.lease_until < now())
              AND (c.retry_at IS NULL OR c.retry_at <= now())
              AND NOT (c.chat_id = ANY ($2))
            LIMIT $1
            FOR UPDATE OF c SKIP LOCKED
        ), leased AS (
            UPDATE memory.chat_metadata c
               SET lease_token = gen_random_uuid(),
                   lease_owner = pg_backend_pid(),
                   lease_owner_start = (SELECT a.backend_start FROM pg_catalog.pg_stat_activity a
                                         WHERE a.pid = pg_backend_pid()),
                   lease_until = now() + make_interval(secs => $3),
                   retry_at = NULL
              FROM locked WHERE c.chat_id = locked.chat_id
            RETURNING c.chat_id
        )
        SELECT array_agg(leased.chat_id) FROM leased
    $q$ INTO v_chats USING p_max_chats, p_exclude, p_lease_seconds;

    IF v_chats IS NULL THEN
        RETURN;
    END IF;

    -- Each chat's oldest pending snippets, through the (chat_id, seq) index; then mark them by
    -- primary key and return them. Separate statements on purpose: as one UPDATE ... FROM with
    -- the LATERAL, statistics taken before a bulk enqueue (autoanalyze lags it by up to a
    -- minute) made the planner drive a nested loop from 100k "1-row" pending rows, and one
    -- claim ran for minutes.
    EXECUTE $q$
        SELECT array_agg(x.id), array_agg(DISTINCT c.chat_id)
          FROM memory.chat_metadata c
          CROSS JOIN LATERAL (
              SELECT o.id FROM memory.chat_context_queue o
               WHERE o.chat_id = c.chat_id AND o.status = 'pending_summarization'
               ORDER BY o.seq LIMIT $2) x
         WHERE c.chat_id = ANY ($1)
    $q$ INTO v_ids, v_with_rows USING v_chats, p_max_snippets;

    -- By primary key only: a status condition here would let the planner pick a partial
    -- (status) index that stale statistics call empty. The rows are still pending: every
    -- writer of a chat's open rows locks the chat row first, and we hold those locks.
    RETURN QUERY EXECUTE $q$
        WITH marked AS (
            UPDATE memory.chat_context_queue q
               SET status = 'processing', claim_token = c.lease_token, claimed_at = now(),
                   lease_expires_at = c.lease_until
              FROM memory.chat_metadata c
             WHERE q.id = ANY ($1) AND c.chat_id = q.chat_id
            RETURNING q.chat_id, q.id, q.seq, q.new_context_snippet
        )
        SELECT c.chat_id, c.lease_token, c.version, c.user_confirmed, c.llm_inferred,
               c.general_summary,
               jsonb_agg(jsonb_build_object('id', m.id, 'text', m.new_context_snippet)
                         ORDER BY m.seq)
          FROM marked m JOIN memory.chat_metadata c ON c.chat_id = m.chat_id
         GROUP BY c.chat_id
    $q$ USING v_ids;

    -- A chat whose rows vanished between the scan and the lease must not stay leased.
    EXECUTE $q$
        UPDATE memory.chat_metadata c
           SET lease_token = NULL, lease_owner = NULL, lease_until = NULL
         WHERE c.chat_id = ANY ($1) AND NOT (c.chat_id = ANY (coalesce($2, '{}')))
    $q$ USING v_chats, v_with_rows;
END
$$;

-- Add one batch's cost to the daily usage rollup.
CREATE FUNCTION memory._record_usage(p_summarizer text, p_applied int, p_failed int,
                                     p_requests bigint, p_prompt bigint, p_completion bigint,
                                     p_rejected bigint)
RETURNS void
LANGUAGE sql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO memory.llm_usage_daily AS u (day, summarizer, batches_applied, attempts_failed,
                                             llm_requests, prompt_tokens, completion_tokens,
                                             rejected_ops)
    VALUES (current_date, p_summarizer, p_applied, p_failed, p_requests, p_prompt, p_completion,
            p_rejected)
    ON CONFLICT (day, summarizer) DO UPDATE
       SET batches_applied = u.batches_applied + excluded.batches_applied,
           attempts_failed = u.attempts_failed + excluded.attempts_failed,
           llm_requests = u.llm_requests + excluded.llm_requests,
           prompt_tokens = u.prompt_tokens + excluded.prompt_tokens,
           completion_tokens = u.completion_tokens + excluded.completion_tokens,
           rejected_ops = u.rejected_ops + excluded.rejected_ops
$$;

-- Apply merged memories. p_results is a JSON array of
-- {chat_id, lease_token, queue_ids, user_confirmed, llm_inferred, general_summary, token_count,
--  needs_new_chat, llm_requests, prompt_tokens, completion_tokens, rejected_ops}. A result whose lease is no longer held (expired and reclaimed, or the chat
-- was forgotten) is skipped, so a snippet is never applied twice. Returns the number applied.
CREATE FUNCTION memory._apply(p_results jsonb, p_summarizer text)
RETURNS int
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;
    old memory.chat_metadata%ROWTYPE;
    n_rows int;
    n_applied int := 0;
    v_requests bigint := 0;
    v_prompt bigint := 0;
    v_completion bigint := 0;
    v_rejected bigint := 0;
BEGIN
    FOR r IN SELECT * FROM jsonb_to_recordset(p_results) AS x(
        chat_id text, lease_token uuid, queue_ids uuid[], user_confirmed jsonb, llm_inferred jsonb,
        general_summary text, token_count int, needs_new_chat bool, llm_requests int,
        prompt_tokens bigint, completion_tokens bigint, rejected_ops int)
    LOOP
        SELECT * INTO old FROM memory.chat_metadata c WHERE c.chat_id = r.chat_id FOR UPDATE;
        IF NOT FOUND OR old.lease_token IS DISTINCT FROM r.lease_token THEN
            CONTINUE;
        END IF;
        -- Every writer of a leased chat's rows (claim, fail, reclaim, forget) locks the chat row
        -- first, so holding it and the lease token means the claimed rows are still ours.
        UPDATE memory.chat_context_queue q
           SET status = 'complete', processed_at = now(), claim_token = NULL,
               lease_expires_at = NULL
         WHERE q.id = ANY (r.queue_ids) AND q.status = 'processing'
           AND q.claim_token = r.lease_token;
        GET DIAGNOSTICS n_rows = ROW_COUNT;
        IF n_rows <> cardinality(r.queue_ids) THEN
            RAISE EXCEPTION 'claimed snippets of chat "%" changed under its lease (% of % left)',
                r.chat_id, n_rows, cardinality(r.queue_ids);
        END IF;

        UPDATE memory.chat_metadata c
           SET user_confirmed = r.user_confirmed, llm_inferred = r.llm_inferred,
               general_summary = r.general_summary, token_count = r.token_count,
               needs_new_chat = r.needs_new_chat, version = c.version + 1, last_updated = now(),
               lease_token = NULL, lease_owner = NULL, lease_until = NULL, retry_at = NULL
         WHERE c.chat_id = r.chat_id;

        INSERT INTO memory.chat_memory_history (chat_id, version, queue_ids, old_user_confirmed,
            old_llm_inferred, old_general_summary, user_confirmed, llm_inferred, general_summary,
            token_count, summarizer, llm_requests, prompt_tokens, completion_tokens, rejected_ops)
        VALUES (r.chat_id, old.version + 1, r.queue_ids, old.user_confirmed, old.llm_inferred,
            old.general_summary, r.user_confirmed, r.llm_inferred, r.general_summary,
            r.token_count, p_summarizer, coalesce(r.llm_requests, 0),
            coalesce(r.prompt_tokens, 0), coalesce(r.completion_tokens, 0),
            coalesce(r.rejected_ops, 0));
        n_applied := n_applied + 1;
        v_requests := v_requests + coalesce(r.llm_requests, 0);
        v_prompt := v_prompt + coalesce(r.prompt_tokens, 0);
        v_completion := v_completion + coalesce(r.completion_tokens, 0);
        v_rejected := v_rejected + coalesce(r.rejected_ops, 0);
    END LOOP;
    IF n_applied > 0 THEN
        PERFORM memory._record_usage(p_summarizer, n_applied, 0, v_requests, v_prompt,
                                     v_completion, v_rejected);
    END IF;
    RETURN n_applied;
END
$$;

-- Record a failed attempt for a leased chat: every claimed row gets retry_count + 1 and the
-- error; rows that reached p_max_attempts (or all of them, for a permanent error) become
-- 'failed', the others wait for the same backoff (exponential, capped, with jitter; or exactly
-- p_retry_after_ms when the endpoint said so), which also holds back the chat's newer snippets
-- so order is kept. The memory is not touched; what the attempt cost is recorded.
CREATE FUNCTION memory._fail(p_chat_id text, p_lease_token uuid, p_error text, p_permanent bool,
                             p_max_attempts int, p_backoff_base_ms int, p_backoff_max_ms int,
                             p_retry_after_ms int DEFAULT NULL, p_summarizer text DEFAULT NULL,
                             p_usage jsonb DEFAULT NULL)
RETURNS int
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_attempt int;
    v_retry_at timestamptz;
    v_n int;
BEGIN
    PERFORM 1 FROM memory.chat_metadata c
     WHERE c.chat_id = p_chat_id AND c.lease_token = p_lease_token FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    SELECT max(q.retry_count) + 1 INTO v_attempt FROM memory.chat_context_queue q
     WHERE q.chat_id = p_chat_id AND q.claim_token = p_lease_token AND q.status = 'processing';
    v_retry_at := now() + make_interval(secs => coalesce(p_retry_after_ms::float8,
        least(p_backoff_max_ms::float8, p_backoff_base_ms * power(2.0, coalesce(v_attempt, 1) - 1))
        * (0.5 + random() / 2)) / 1000.0);

    UPDATE memory.chat_context_queue q
       SET retry_count = q.retry_count + 1,
           error_message = left(p_error, 2000),
           status = CASE WHEN p_permanent OR q.retry_count + 1 >= p_max_attempts
                         THEN 'failed' ELSE 'pending_summarization' END,
           processed_at = CASE WHEN p_permanent OR q.retry_count + 1 >= p_max_attempts
                               THEN now() END,
           next_attempt_at = v_retry_at, claim_token = NULL, lease_expires_at = NULL
     WHERE q.chat_id = p_chat_id AND q.claim_token = p_lease_token AND q.status = 'processing';
    GET DIAGNOSTICS v_n = ROW_COUNT;
    -- Newer snippets of the chat wait too: they must not be applied before the failed ones.
    UPDATE memory.chat_context_queue q SET next_attempt_at = v_retry_at
     WHERE q.chat_id = p_chat_id AND q.status = 'pending_summarization'
       AND q.next_attempt_at < v_retry_at;

    UPDATE memory.chat_metadata c
       SET lease_token = NULL, lease_owner = NULL, lease_until = NULL,
           retry_at = CASE WHEN EXISTS (SELECT 1 FROM memory.chat_context_queue q
                                         WHERE q.chat_id = c.chat_id
                                           AND q.status = 'pending_summarization')
                           THEN v_retry_at END
     WHERE c.chat_id = p_chat_id;
    IF p_summarizer IS NOT NULL THEN
        PERFORM memory._record_usage(p_summarizer, 0, 1,
            coalesce((p_usage->>'llm_requests')::bigint, 0),
            coalesce((p_usage->>'prompt_tokens')::bigint, 0),
            coalesce((p_usage->>'completion_tokens')::bigint, 0),
            coalesce((p_usage->>'rejected_ops')::bigint, 0));
    END IF;
    RETURN v_n;
END
$$;

-- Give a lease back without counting an attempt: the worker is stopping while the chat's LLM
-- request is still in flight. Its snippets are pending again, due at once.
CREATE FUNCTION memory._release(p_chat_id text, p_lease_token uuid)
RETURNS int
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_n int;
BEGIN
    PERFORM 1 FROM memory.chat_metadata c
     WHERE c.chat_id = p_chat_id AND c.lease_token = p_lease_token FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    UPDATE memory.chat_context_queue q
       SET status = 'pending_summarization', claim_token = NULL, lease_expires_at = NULL
     WHERE q.chat_id = p_chat_id AND q.claim_token = p_lease_token AND q.status = 'processing';
    GET DIAGNOSTICS v_n = ROW_COUNT;
    UPDATE memory.chat_metadata c
       SET lease_token = NULL, lease_owner = NULL, lease_until = NULL
     WHERE c.chat_id = p_chat_id;
    RETURN v_n;
END
$$;

-- Take back leases whose holder is gone: expired ones, or (p_dead_owners) ones held by a
-- process that no longer exists, e.g. after a crash or on a promoted standby. A process is its pid
-- and start time, since pids are reused. The attempt counts as failed, so a snippet
-- that kills its worker every time ends 'failed' instead of looping forever.
CREATE FUNCTION memory._reclaim(p_max_attempts int, p_dead_owners bool)
RETURNS int
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_n int;
BEGIN
    WITH stale AS (
        SELECT c.chat_id, c.lease_token FROM memory.chat_metadata c
         WHERE c.lease_token IS NOT NULL
           AND (c.lease_until < now()
                OR (p_dead_owners AND c.lease_owner <> pg_backend_pid()
                    AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a
                                     WHERE a.pid = c.lease_owner
                                       AND a.backend_start = c.lease_owner_start)))
           FOR UPDATE OF c SKIP LOCKED
    ), released AS (
        UPDATE memory.chat_metadata c
           SET lease_token = NULL, lease_owner = NULL, lease_until = NULL
          FROM stale WHERE c.chat_id = stale.chat_id
        RETURNING stale.chat_id, stale.lease_token
    )
    UPDATE memory.chat_context_queue q
       SET retry_count = q.retry_count + 1,
           error_message = 'lease expired: the process summarizing this snippet stopped or '
                           'took longer than memory_ext.lease_timeout',
           status = CASE WHEN q.retry_count + 1 >= p_max_attempts
                         THEN 'failed' ELSE 'pending_summarization' END,
           processed_at = CASE WHEN q.retry_count + 1 >= p_max_attempts THEN now() END,
           next_attempt_at = now(), claim_token = NULL, lease_expires_at = NULL
      FROM released
     WHERE q.chat_id = released.chat_id AND q.claim_token = released.lease_token
       AND q.status = 'processing';
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END
$$;

-- Delete up to p_batch complete rows older than the retention period, and up to p_batch audit
-- rows older than the audit retention; returns how many rows were deleted.
CREATE FUNCTION memory._cleanup(p_retention_seconds int, p_batch int,
                                p_audit_retention_seconds int DEFAULT NULL)
RETURNS int
LANGUAGE sql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH old AS (
        SELECT q.id FROM memory.chat_context_queue q
         WHERE q.status = 'complete'
           AND q.processed_at < now() - make_interval(secs => p_retention_seconds)
         ORDER BY q.processed_at LIMIT p_batch
           FOR UPDATE SKIP LOCKED
    ), gone AS (
        DELETE FROM memory.chat_context_queue q USING old WHERE q.id = old.id RETURNING 1
    ), old_audit AS (
        SELECT a.ctid FROM memory.audit_log a
         WHERE p_audit_retention_seconds IS NOT NULL
           AND a.at < now() - make_interval(secs => p_audit_retention_seconds)
         LIMIT p_batch
    ), gone_audit AS (
        DELETE FROM memory.audit_log a USING old_audit WHERE a.ctid = old_audit.ctid RETURNING 1
    )
    SELECT ((SELECT count(*) FROM gone) + (SELECT count(*) FROM gone_audit))::int
$$;

-- When the worker must look again even if nobody wakes it: the next backoff expiry or lease
-- expiry. NULL when nothing is scheduled.
CREATE FUNCTION memory._next_due()
RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT least(
        (SELECT min(q.next_attempt_at) FROM memory.chat_context_queue q
          WHERE q.status = 'pending_summarization'),
        (SELECT min(q.lease_expires_at) FROM memory.chat_context_queue q
          WHERE q.status = 'processing'))
$$;

REVOKE ALL ON FUNCTION memory._claim(int, int, int, text[]), memory._apply(jsonb, text),
    memory._fail(text, uuid, text, bool, int, int, int, int, text, jsonb),
    memory._release(text, uuid), memory._reclaim(int, bool),
    memory._record_usage(text, int, int, bigint, bigint, bigint, bigint),
    memory._cleanup(int, int, int), memory._next_due() FROM PUBLIC;
