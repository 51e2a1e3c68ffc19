-- Claiming and applying work. Called by the worker (and process_pending) from Rust, which owns
-- summarizing and the merge rules; these functions own every row movement. Internal: no caller
-- but the extension's own code should run them.

-- Candidate chats for a claim of up to p_max_chats, best first (ord). Fair by construction:
-- - a chat is one row however long its backlog, and a leased chat is no candidate at all;
-- - owners take turns: each owner's first chat (by due_at) comes before anyone's second, and
--   among those the owner served longest ago (owner_turns) comes first;
-- so a due chat of an owner with no chat in flight is claimed at the next claim with a free
-- slot, whatever other owners have queued. Ranked among the oldest 10,000 due chats.
CREATE FUNCTION memory._due_chats(p_max_chats int)
RETURNS TABLE (chat_id text, ord bigint)
LANGUAGE plpgsql STABLE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- Dynamic SQL: planned afresh each time (see _claim).
    RETURN QUERY EXECUTE $q$
        SELECT d.chat_id, row_number() OVER (ORDER BY d.turn, t.served_at NULLS FIRST, d.due_at)
          FROM (SELECT c.chat_id, c.owner, c.due_at,
                       row_number() OVER (PARTITION BY c.owner ORDER BY c.due_at) AS turn
                  FROM (SELECT m.chat_id, m.owner, m.due_at FROM memory.chat_metadata m
                         WHERE m.due_at <= now() AND m.lease_token IS NULL
                         ORDER BY m.due_at LIMIT 10000) c) d
          LEFT JOIN memory.owner_turns t ON t.owner = d.owner
         ORDER BY 2
         LIMIT $1 * 4
    $q$ USING p_max_chats;
END
$$;

-- Move chats' captured rows (memory.capture_inbox) into the queue, keeping id and seq, with the
-- audit row each enqueue writes (at its capture time). The caller holds the chats' rows at least
-- FOR NO KEY UPDATE. A capture drew its seq under KEY SHARE, so under FOR UPDATE none is in
-- flight and every lower seq is visible; under NO KEY UPDATE a capture may still commit a lower
-- seq later, and the next claim, holding FOR UPDATE, moves it before it takes the oldest. Returns
-- how many rows moved. Planned on every call (plan_cache_mode): a plan the worker's long-lived
-- backend cached while the inbox was empty would scan all of it once it holds a backlog, on every
-- claim and finish (measured: 48 ms a call at 300k captured rows, 0.9 ms planned afresh).
CREATE FUNCTION memory._take_captured(p_chats text[])
RETURNS int
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    v_n int;
BEGIN
    -- most calls (every finish, most claims) find nothing: one index probe, not three writes
    IF NOT EXISTS (SELECT 1 FROM memory.capture_inbox i WHERE i.chat_id = ANY (p_chats)) THEN
        RETURN 0;
    END IF;
    WITH moved AS (
        DELETE FROM memory.capture_inbox i WHERE i.chat_id = ANY (p_chats)
        RETURNING i.id, i.seq, i.chat_id, i.snippet, i.source, i.enqueued_by, i.identity,
                  i.role, i.captured_at, i.next_attempt_at
    ), queued AS (
        INSERT INTO memory.chat_context_queue (id, seq, chat_id, new_context_snippet,
                                               trigger_source, enqueued_by, created_at,
                                               next_attempt_at)
        SELECT m.id, m.seq, m.chat_id, m.snippet, m.source, m.enqueued_by, m.captured_at,
               m.next_attempt_at
          FROM moved m ORDER BY m.seq
        RETURNING 1
    ), audited AS (
        INSERT INTO memory.audit_log (at, identity, role, action, chat_id, queue_id, detail)
        SELECT m.captured_at, coalesce(m.identity, '(none)'), m.role, 'enqueue', m.chat_id, m.id,
               m.source
          FROM moved m ORDER BY m.seq
    )
    SELECT count(*) INTO v_n FROM queued;
    RETURN v_n;
END
$$;

-- Lease up to p_max_chats chats that have due work and are neither leased nor backing off, and
-- mark up to p_max_snippets of each one's pending snippets 'processing' under that lease.
-- Returns each leased chat's current memory (the one being rebuilt, during a rebuild) and its
-- snippets in enqueue order.
--
-- A chat with a lease, even an expired one, is never claimed: _reclaim (which callers run first,
-- in the same transaction) ends stale leases and returns their rows. The chat row is locked FOR
-- UPDATE, which conflicts with the KEY SHARE lock enqueue takes before it draws a seq, so no
-- enqueue into a claimed chat is in progress: every row with a lower seq is visible, and the
-- claimed rows are exactly the chat's oldest.
CREATE FUNCTION memory._claim(p_max_chats int, p_max_snippets int, p_lease_seconds int)
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
    EXECUTE $q$
        WITH locked AS (
            SELECT c.chat_id FROM memory.chat_metadata c
              JOIN memory._due_chats($1) cand ON cand.chat_id = c.chat_id
            WHERE c.lease_token IS NULL AND c.due_at <= now()
            ORDER BY cand.ord
            LIMIT $1
            FOR UPDATE OF c SKIP LOCKED
        ), leased AS (
            UPDATE memory.chat_metadata c
               SET lease_token = gen_random_uuid(),
                   lease_owner = pg_backend_pid(),
                   lease_owner_start = (SELECT a.backend_start FROM pg_catalog.pg_stat_activity a
                                         WHERE a.pid = pg_backend_pid()),
                   lease_until = now() + make_interval(secs => $2),
                   retry_at = NULL
              FROM locked WHERE c.chat_id = locked.chat_id
            RETURNING c.chat_id, c.owner
        ), turns AS (
            INSERT INTO memory.owner_turns AS t (owner, served_at)
            -- in owner order: concurrent claims (a worker and its helpers) lock the rows of
            -- owners they share in the same order, so they never deadlock
            SELECT DISTINCT leased.owner, now() FROM leased ORDER BY 1
            ON CONFLICT (owner) DO UPDATE SET served_at = excluded.served_at
        )
        SELECT array_agg(leased.chat_id) FROM leased
    $q$ INTO v_chats USING p_max_chats, p_lease_seconds;

    IF v_chats IS NULL THEN
        RETURN;
    END IF;
    -- We hold the chats FOR UPDATE: no capture into them is in flight, so every captured row
    -- with a lower seq than a queued one is committed, and is moved before the oldest are taken.
    PERFORM memory._take_captured(v_chats);

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
        SELECT c.chat_id, c.lease_token, c.version,
               coalesce(c.rebuild -> 'user_confirmed', c.user_confirmed),
               coalesce(c.rebuild -> 'llm_inferred', c.llm_inferred),
               coalesce(c.rebuild ->> 'general_summary', c.general_summary),
               jsonb_agg(jsonb_build_object('id', m.id, 'text', m.new_context_snippet)
                         ORDER BY m.seq)
          FROM marked m JOIN memory.chat_metadata c ON c.chat_id = m.chat_id
         GROUP BY c.chat_id
    $q$ USING v_ids;

    -- A chat with no pending rows (they vanished, or due_at was a "maybe" left by _return_claimed)
    -- must not stay leased, and has no work: we hold it FOR UPDATE, so no enqueue is in flight.
    EXECUTE $q$
        UPDATE memory.chat_metadata c
           SET lease_token = NULL, lease_owner = NULL, lease_owner_start = NULL,
               lease_until = NULL, due_at = NULL
         WHERE c.chat_id = ANY ($1) AND NOT (c.chat_id = ANY (coalesce($2, '{}')))
    $q$ USING v_chats, v_with_rows;
END
$$;

-- What _claim would take, without taking it: for process_pending(), which runs in its caller's
-- transaction and so must not hold a chat's row lock while its LLM request runs. It summarizes
-- what this returns with no lock held, then takes exactly that with _claim_exact.
CREATE FUNCTION memory._peek(p_max_chats int, p_max_snippets int)
RETURNS TABLE (chat_id text, lease_token uuid, version bigint, user_confirmed jsonb,
               llm_inferred jsonb, general_summary text, snippets jsonb)
LANGUAGE plpgsql STABLE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY EXECUTE $q$
        SELECT c.chat_id, NULL::uuid, c.version,
               coalesce(c.rebuild -> 'user_confirmed', c.user_confirmed),
               coalesce(c.rebuild -> 'llm_inferred', c.llm_inferred),
               coalesce(c.rebuild ->> 'general_summary', c.general_summary), s.snippets
          FROM memory.chat_metadata c JOIN memory._due_chats($1) cand ON cand.chat_id = c.chat_id
         CROSS JOIN LATERAL (
               SELECT jsonb_agg(jsonb_build_object('id', o.id, 'text', o.new_context_snippet)
                                ORDER BY o.seq) AS snippets
                 FROM (SELECT o.id, o.seq, o.new_context_snippet
                         FROM memory.chat_context_queue o
                        WHERE o.chat_id = c.chat_id AND o.status = 'pending_summarization'
                       UNION ALL
                       -- captured rows: _claim_exact moves them, keeping id and seq
                       SELECT i.id, i.seq, i.snippet
                         FROM memory.capture_inbox i WHERE i.chat_id = c.chat_id
                        ORDER BY seq LIMIT $2) o) s
         WHERE c.lease_token IS NULL AND s.snippets IS NOT NULL
         ORDER BY cand.ord
         LIMIT $1
    $q$ USING p_max_chats, p_max_snippets;
END
$$;

-- Lease a chat and claim exactly p_ids, if they are still its oldest pending snippets and its
-- memory is still at p_version (what _peek returned): then a result summarized from the peek is
-- exactly what a claim would have produced. NULL when anything changed or another process holds
-- the chat; the caller then drops its result.
CREATE FUNCTION memory._claim_exact(p_chat_id text, p_version bigint, p_ids uuid[],
                                    p_lease_seconds int)
RETURNS uuid
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_token uuid := gen_random_uuid();
BEGIN
    -- FOR UPDATE, as in _claim: no enqueue into the chat is in progress once we hold it.
    PERFORM 1 FROM memory.chat_metadata c
     WHERE c.chat_id = p_chat_id AND c.lease_token IS NULL AND c.version = p_version
       AND c.due_at <= now()
       FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    PERFORM memory._take_captured(ARRAY[p_chat_id]);
    IF (SELECT array_agg(o.id ORDER BY o.seq)
                       FROM (SELECT o.id, o.seq FROM memory.chat_context_queue o
                              WHERE o.chat_id = p_chat_id
                                AND o.status = 'pending_summarization'
                              ORDER BY o.seq LIMIT cardinality(p_ids)) o)
                     IS DISTINCT FROM p_ids THEN
        RETURN NULL;
    END IF;
    UPDATE memory.chat_metadata c
       SET lease_token = v_token, lease_owner = pg_backend_pid(),
           lease_owner_start = (SELECT a.backend_start FROM pg_catalog.pg_stat_activity a
                                 WHERE a.pid = pg_backend_pid()),
           lease_until = now() + make_interval(secs => p_lease_seconds), retry_at = NULL
     WHERE c.chat_id = p_chat_id;
    UPDATE memory.chat_context_queue q
       SET status = 'processing', claim_token = v_token, claimed_at = now(),
           lease_expires_at = now() + make_interval(secs => p_lease_seconds)
     WHERE q.id = ANY (p_ids);
    RETURN v_token;
END
$$;

-- Add one batch's cost to the daily usage rollup.
CREATE FUNCTION memory._record_usage(p_summarizer text, p_applied int, p_failed int,
                                     p_requests bigint, p_prompt bigint, p_completion bigint,
                                     p_rejected bigint, p_cached bigint, p_cache_write bigint)
RETURNS void
LANGUAGE sql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO memory.llm_usage_daily AS u (day, summarizer, batches_applied, attempts_failed,
                                             llm_requests, prompt_tokens, completion_tokens,
                                             rejected_ops, cached_prompt_tokens,
                                             cache_write_tokens)
    VALUES (current_date, p_summarizer, p_applied, p_failed, p_requests, p_prompt, p_completion,
            p_rejected, p_cached, p_cache_write)
    ON CONFLICT (day, summarizer) DO UPDATE
       SET batches_applied = u.batches_applied + excluded.batches_applied,
           attempts_failed = u.attempts_failed + excluded.attempts_failed,
           llm_requests = u.llm_requests + excluded.llm_requests,
           prompt_tokens = u.prompt_tokens + excluded.prompt_tokens,
           completion_tokens = u.completion_tokens + excluded.completion_tokens,
           rejected_ops = u.rejected_ops + excluded.rejected_ops,
           cached_prompt_tokens = u.cached_prompt_tokens + excluded.cached_prompt_tokens,
           cache_write_tokens = u.cache_write_tokens + excluded.cache_write_tokens
$$;

-- What a snippet's owner is told about a failed attempt: its class, never the provider's text
-- (which may quote a masked key, an organisation id, an upstream host). Admins see the full
-- error_message through memory.status().
CREATE FUNCTION memory._public_error(p_kind text)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE p_kind
    WHEN 'transient' THEN 'the summarizer failed; it will be retried'
    WHEN 'rate_limited' THEN 'the summarizer is rate limited; it will be retried'
    WHEN 'too_long' THEN 'the snippet does not fit the model''s context'
    WHEN 'refused' THEN 'the summarizer refused the snippet'
    WHEN 'permanent' THEN 'the summarizer rejected the request; an admin must check its settings'
    WHEN 'config' THEN 'the summarizer is not configured; it will be retried once it is'
    WHEN 'apply' THEN 'the memory could not be written; it will be retried'
    WHEN 'lease' THEN 'the summarization was interrupted; it will be retried'
    ELSE 'the summarization failed'
END;

-- When a chat with pending snippets becomes due under memory_ext.debounce: once it has been
-- quiet for debounce after its newest pending snippet, and at most debounce_max after its oldest,
-- never before p_due (a backoff, or now). p_due itself when debounce is off or nothing is pending.
CREATE FUNCTION memory._debounced_due(p_chat_id text, p_due timestamptz)
RETURNS timestamptz
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_debounce int := memory._debounce_ms();
    v_first timestamptz;
    v_last timestamptz;
BEGIN
    IF v_debounce <= 0 THEN
        RETURN p_due;
    END IF;
    -- captured rows not yet moved into the queue are pending too
    SELECT min(x.at), max(x.at) INTO v_first, v_last
      FROM (SELECT q.created_at AS at FROM memory.chat_context_queue q
             WHERE q.chat_id = p_chat_id AND q.status = 'pending_summarization'
            UNION ALL
            SELECT i.captured_at FROM memory.capture_inbox i WHERE i.chat_id = p_chat_id) x;
    IF v_first IS NULL THEN
        RETURN p_due;
    END IF;
    RETURN greatest(p_due, least(v_last + v_debounce * interval '1 ms',
                                 v_first + memory._debounce_max_ms() * interval '1 ms'));
END
$$;

-- After an enqueue with debounce on: the chat is due when _debounced_due says, each new snippet
-- pushing it back. A chat being summarized keeps its due_at (its finish reckons it the same way)
-- unless it had none. Returns the chat's due time.
CREATE FUNCTION memory._debounce_chat(p_chat_id text, p_due timestamptz)
RETURNS timestamptz
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_due timestamptz := memory._debounced_due(p_chat_id, p_due);
    v_set timestamptz;
BEGIN
    -- retry_at as the row has it when the UPDATE runs: a finish this waited for may have just
    -- set a backoff, which the debounce must not shorten
    UPDATE memory.chat_metadata m SET due_at = greatest(v_due, m.retry_at)
     WHERE m.chat_id = p_chat_id AND (m.lease_token IS NULL OR m.due_at IS NULL)
    RETURNING m.due_at INTO v_set;
    RETURN coalesce(v_set, v_due);
END
$$;

-- When a chat's oldest pending snippet may be claimed: not before p_due, and with memory_ext.
-- debounce, not before the chat has been quiet. NULL when nothing is pending (greatest() alone
-- would skip the NULL and answer p_due, marking every finished chat due again). The caller moves
-- the chat's captured rows into the queue first, so that they count.
CREATE FUNCTION memory._next_pending_due(p_chat_id text, p_due timestamptz)
RETURNS timestamptz
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_first_due timestamptz;
BEGIN
    SELECT min(q.next_attempt_at) INTO v_first_due FROM memory.chat_context_queue q
     WHERE q.chat_id = p_chat_id AND q.status = 'pending_summarization';
    IF v_first_due IS NULL THEN
        RETURN NULL;
    END IF;
    RETURN memory._debounced_due(p_chat_id, greatest(v_first_due, p_due));
END
$$;

-- Give back every row a chat has claimed and end its lease. The one way a lease ends without
-- applying: a failed attempt (_finish), an expired lease or a dead holder (_reclaim), a stopping
-- worker (_release). The caller holds the chat row lock. All of the chat's 'processing' rows go,
-- whatever lease they were claimed under, so no row can be stranded by a lost lease. Their seq is
-- unchanged, so they are claimed again in their original order, before any newer row.
-- p_count_attempt: the attempt counts (retry_count + 1, p_error recorded; rows reaching
-- p_max_attempts, or all rows when p_permanent, become 'failed'). p_retry_at: nothing of the chat
-- is claimed before it (backoff), newer rows included, so order is kept. During a rebuild, the
-- rebuilt memory is applied once its last snippet is settled (applied or failed).
CREATE FUNCTION memory._return_claimed(p_chat_id text, p_count_attempt bool, p_permanent bool,
                                       p_error text, p_kind text, p_max_attempts int,
                                       p_retry_at timestamptz)
RETURNS int
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_n int;
    v_due timestamptz := greatest(p_retry_at, now());
    v_next timestamptz;
    v_rebuilding bool;
BEGIN
    -- captured rows into the queue first: the backoff below holds them back too
    PERFORM memory._take_captured(ARRAY[p_chat_id]);
    UPDATE memory.chat_context_queue q
       SET retry_count = q.retry_count + CASE WHEN p_count_attempt THEN 1 ELSE 0 END,
           error_message = CASE WHEN p_count_attempt THEN left(p_error, 2000)
                                ELSE q.error_message END,
           error_public = CASE WHEN p_count_attempt THEN memory._public_error(p_kind)
                               ELSE q.error_public END,
           status = CASE WHEN p_permanent
                           OR (p_count_attempt AND q.retry_count + 1 >= p_max_attempts)
                         THEN 'failed' ELSE 'pending_summarization' END,
           processed_at = CASE WHEN p_permanent
                                 OR (p_count_attempt AND q.retry_count + 1 >= p_max_attempts)
                               THEN now() END,
           next_attempt_at = v_due, claim_token = NULL, claimed_at = NULL,
           lease_expires_at = NULL
     WHERE q.chat_id = p_chat_id AND q.status = 'processing';
    GET DIAGNOSTICS v_n = ROW_COUNT;
    IF v_due > now() THEN
        UPDATE memory.chat_context_queue q SET next_attempt_at = v_due
         WHERE q.chat_id = p_chat_id AND q.status = 'pending_summarization'
           AND q.next_attempt_at < v_due;
    END IF;
    v_next := memory._next_pending_due(p_chat_id, v_due);
    IF v_next IS NULL THEN
        -- No pending row we can see. An enqueue still in flight holds KEY SHARE on the chat and
        -- left due_at as it was (it writes due_at only when it is NULL): clear it only if no
        -- such enqueue exists (FOR UPDATE would conflict), else leave a "maybe" for the next
        -- claim to settle. Once locked, look again (a new snapshot): an enqueue that committed
        -- between the first look and the lock is seen. Under a fixed snapshot (a caller's
        -- REPEATABLE READ) a second look sees nothing new: leave the "maybe". Never a lost wake-up.
        PERFORM 1 FROM memory.chat_metadata c WHERE c.chat_id = p_chat_id FOR UPDATE SKIP LOCKED;
        IF NOT FOUND OR pg_catalog.current_setting('transaction_isolation') <> 'read committed' THEN
            v_next := now();
        ELSE
            -- a capture that committed meanwhile left its row in the inbox
            PERFORM memory._take_captured(ARRAY[p_chat_id]);
            v_next := memory._next_pending_due(p_chat_id, v_due);
        END IF;
    END IF;
    UPDATE memory.chat_metadata c
       SET lease_token = NULL, lease_owner = NULL, lease_owner_start = NULL, lease_until = NULL,
           retry_at = CASE WHEN v_due > now() AND v_next IS NOT NULL THEN v_due END,
           -- behind every chat already waiting: chats take turns
           due_at = v_next
     WHERE c.chat_id = p_chat_id
    RETURNING c.rebuild IS NOT NULL INTO v_rebuilding;
    IF v_rebuilding THEN
        PERFORM memory._settle_rebuild(p_chat_id);
    END IF;
    RETURN v_n;
END
$$;

-- Finish leased summarizations. p_results is a JSON array, one element per lease:
--   {chat_id, lease_token,
--    applied_ids: [..]   the snippets merged into the memory below, in order (may be empty),
--    user_confirmed, llm_inferred, general_summary, token_count, needs_new_chat,
--    context, context_tokens   the memory as context() renders it, and its token count,
--    dead: [{id, error}] snippets the summarizer refused on their own (dead-lettered alone),
--    failure: {error, permanent, retry_after_ms} | null   for every other claimed snippet,
--    usage: {llm_requests, prompt_tokens, completion_tokens, rejected_ops, cached_prompt_tokens,
--            cache_write_tokens}}
-- A result whose lease is no longer held (it expired and was reclaimed, or the chat was
-- forgotten) changes nothing: a snippet is never applied twice. The memory update, the rows'
-- new status and the end of the lease commit together.
-- The worker never waits for a client's lock: a chat row another transaction holds (a client's
-- open forget(), an admin's SELECT ... FOR UPDATE) is skipped and reported busy; the caller keeps
-- that result and finishes it later, spending no attempt. Returns {applied: n, busy: [chat ids]}.
CREATE FUNCTION memory._finish(p_results jsonb, p_summarizer text, p_max_attempts int,
                               p_backoff_base_ms int, p_backoff_max_ms int,
                               p_history_versions int DEFAULT 0)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;
    v_applied int := 0;
    v_failed int := 0;
    v_busy text[] := '{}';
    v_done bool;
    v_dead bool;
    v_usage bigint[] := '{0,0,0,0,0,0}';
BEGIN
    FOR r IN SELECT * FROM jsonb_to_recordset(p_results) AS x(
        chat_id text, lease_token uuid, applied_ids uuid[], user_confirmed jsonb,
        llm_inferred jsonb, general_summary text, token_count int, needs_new_chat bool,
        context text, context_tokens int, dead jsonb, failure jsonb, usage jsonb)
    LOOP
        -- NO KEY UPDATE: excludes the other finishers and reclaimers of this chat, not enqueues
        -- (only a finish that leaves the chat idle takes it FOR UPDATE: see _return_claimed).
        PERFORM 1 FROM memory.chat_metadata c
         WHERE c.chat_id = r.chat_id AND c.lease_token = r.lease_token
           FOR NO KEY UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            IF EXISTS (SELECT 1 FROM memory.chat_metadata c
                        WHERE c.chat_id = r.chat_id AND c.lease_token = r.lease_token) THEN
                v_busy := v_busy || r.chat_id;
            ELSIF coalesce((r.usage ->> 'llm_requests')::bigint, 0) > 0 THEN
                -- The lease was lost (expired, or called off by rebuild, forget_snippet or
                -- rollback): the result is dropped, but its requests were paid for. They count,
                -- for the owner's budget and in the usage rollup, once: a dropped result is never
                -- finished again.
                PERFORM memory._record_owner_usage(r.chat_id, r.usage);
                v_failed := v_failed + 1;
                v_usage := memory._usage_sum(v_usage, r.usage);
            END IF;
            CONTINUE;
        END IF;
        v_done := memory._finish_applied(r.chat_id, r.lease_token, r.applied_ids,
                                         r.user_confirmed, r.llm_inferred, r.general_summary,
                                         r.token_count, r.needs_new_chat, p_summarizer,
                                         r.usage, p_history_versions, r.context,
                                         r.context_tokens);
        v_dead := jsonb_array_length(coalesce(r.dead, '[]')) > 0;
        IF v_dead THEN
            PERFORM memory._finish_dead(r.chat_id, r.lease_token, r.dead);
        END IF;
        PERFORM memory._return_claimed(r.chat_id, r.failure IS NOT NULL,
            coalesce((r.failure ->> 'permanent')::bool, false), r.failure ->> 'error',
            r.failure ->> 'kind', p_max_attempts,
            CASE WHEN r.failure IS NULL THEN now()
                 ELSE memory._backoff_until(r.chat_id, r.lease_token,
                          (r.failure ->> 'retry_after_ms')::int, p_backoff_base_ms,
                          p_backoff_max_ms) END);
        IF coalesce((r.usage ->> 'llm_requests')::bigint, 0) > 0 THEN
            PERFORM memory._record_owner_usage(r.chat_id, r.usage);
        END IF;
        v_applied := v_applied + v_done::int;
        -- A dead-lettered snippet is a failed attempt too (it cost a request).
        v_failed := v_failed + (r.failure IS NOT NULL OR v_dead)::int;
        v_usage := memory._usage_sum(v_usage, r.usage);
    END LOOP;
    -- What the batch cost, once per batch (one row per day and summarizer).
    IF v_applied + v_failed > 0 THEN
        PERFORM memory._record_usage(p_summarizer, v_applied, v_failed, v_usage[1], v_usage[2],
                                     v_usage[3], v_usage[4], v_usage[5], v_usage[6]);
    END IF;
    RETURN jsonb_build_object('applied', v_applied, 'busy', to_jsonb(v_busy));
END
$$;

-- A batch's usage so far plus one result's: {requests, prompt, completion, rejected, cached,
-- cache writes}. A SQL-standard body (bound at CREATE time, no SET): inlined into _finish.
CREATE FUNCTION memory._usage_sum(p_sum bigint[], p_usage jsonb)
RETURNS bigint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN ARRAY[p_sum[1] OPERATOR(pg_catalog.+) coalesce((p_usage OPERATOR(pg_catalog.->>) 'llm_requests')::bigint, 0),
             p_sum[2] OPERATOR(pg_catalog.+) coalesce((p_usage OPERATOR(pg_catalog.->>) 'prompt_tokens')::bigint, 0),
             p_sum[3] OPERATOR(pg_catalog.+) coalesce((p_usage OPERATOR(pg_catalog.->>) 'completion_tokens')::bigint, 0),
             p_sum[4] OPERATOR(pg_catalog.+) coalesce((p_usage OPERATOR(pg_catalog.->>) 'rejected_ops')::bigint, 0),
             p_sum[5] OPERATOR(pg_catalog.+) coalesce((p_usage OPERATOR(pg_catalog.->>) 'cached_prompt_tokens')::bigint, 0),
             p_sum[6] OPERATOR(pg_catalog.+) coalesce((p_usage OPERATOR(pg_catalog.->>) 'cache_write_tokens')::bigint, 0)];

-- When a failed attempt may be retried: the endpoint's Retry-After when it gave one, else
-- base × 2^(attempt−1), capped, with 50–100 % jitter (attempt: the highest of the claimed rows).
CREATE FUNCTION memory._backoff_until(p_chat_id text, p_lease_token uuid, p_retry_after_ms int,
                                      p_base_ms int, p_max_ms int)
RETURNS timestamptz
LANGUAGE sql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT now() + make_interval(secs => coalesce(p_retry_after_ms::float8,
        least(p_max_ms::float8, p_base_ms * power(2.0, coalesce(max(q.retry_count), 0)))
        * (0.5 + random() / 2)) / 1000.0)
      FROM memory.chat_context_queue q
     WHERE q.chat_id = p_chat_id AND q.claim_token = p_lease_token AND q.status = 'processing'
$$;

-- The applied part of a result: its rows 'complete', the memory, a history version. Returns
-- whether anything was applied (nothing is when every claimed snippet failed or was refused).
CREATE FUNCTION memory._finish_applied(p_chat_id text, p_lease_token uuid, p_ids uuid[],
                                       p_confirmed jsonb, p_inferred jsonb, p_summary text,
                                       p_token_count int, p_needs_new_chat bool,
                                       p_summarizer text, p_usage jsonb,
                                       p_history_versions int, p_context text,
                                       p_context_tokens int)
RETURNS bool
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    old memory.chat_metadata%ROWTYPE;
    v_n int;
BEGIN
    IF coalesce(cardinality(p_ids), 0) = 0 THEN
        RETURN false;
    END IF;
    -- The lease is held (checked under the chat row lock): every claimed row is still ours.
    -- The chat too: with statistics older than a bulk enqueue, "status = 'processing'" alone let
    -- the planner walk a whole partial index it believed empty (3 ms a chat: a third of the
    -- drain rate); by chat it reads only this chat's open rows, however stale the statistics.
    UPDATE memory.chat_context_queue q
       SET status = 'complete', processed_at = now(), claim_token = NULL,
           lease_expires_at = NULL,
           -- a budget deferral is over once applied (a failure's message stays, for diagnosis)
           error_message = CASE WHEN q.error_public = memory._budget_deferred_message() THEN NULL
                                ELSE q.error_message END,
           error_public = nullif(q.error_public, memory._budget_deferred_message())
     WHERE q.id = ANY (p_ids) AND q.chat_id = p_chat_id AND q.status = 'processing'
       AND q.claim_token = p_lease_token;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    IF v_n <> cardinality(p_ids) THEN
        RAISE EXCEPTION 'claimed snippets of chat "%" changed under its lease (% of % left)',
            p_chat_id, v_n, cardinality(p_ids);
    END IF;
    SELECT * INTO old FROM memory.chat_metadata c WHERE c.chat_id = p_chat_id;
    IF old.rebuild IS NOT NULL THEN
        -- Re-deriving: the result goes onto the memory being rebuilt, which _return_claimed
        -- applies as one version once its last snippet is settled.
        UPDATE memory.chat_metadata c
           SET rebuild = old.rebuild || jsonb_build_object(
                   'user_confirmed', p_confirmed, 'llm_inferred', p_inferred,
                   'general_summary', p_summary, 'summarizer', p_summarizer,
                   'ids', (old.rebuild -> 'ids') || to_jsonb(p_ids),
                   'usage', memory._add_usage(old.rebuild -> 'usage', p_usage))
         WHERE c.chat_id = p_chat_id;
        RETURN true;
    END IF;
    UPDATE memory.chat_metadata c
       SET user_confirmed = p_confirmed, llm_inferred = p_inferred,
           general_summary = p_summary, token_count = p_token_count,
           needs_new_chat = p_needs_new_chat, version = c.version + 1, last_updated = now(),
           context_text = p_context, context_tokens = p_context_tokens
     WHERE c.chat_id = p_chat_id;
    INSERT INTO memory.chat_memory_history (chat_id, version, queue_ids, old_user_confirmed,
        old_llm_inferred, old_general_summary, user_confirmed, llm_inferred, general_summary,
        token_count, summarizer, llm_requests, prompt_tokens, completion_tokens, rejected_ops,
        cached_prompt_tokens, cache_write_tokens)
    VALUES (p_chat_id, old.version + 1, p_ids, old.user_confirmed, old.llm_inferred,
        old.general_summary, p_confirmed, p_inferred, p_summary, p_token_count, p_summarizer,
        coalesce((p_usage ->> 'llm_requests')::int, 0),
        coalesce((p_usage ->> 'prompt_tokens')::bigint, 0),
        coalesce((p_usage ->> 'completion_tokens')::bigint, 0),
        coalesce((p_usage ->> 'rejected_ops')::int, 0),
        coalesce((p_usage ->> 'cached_prompt_tokens')::bigint, 0),
        coalesce((p_usage ->> 'cache_write_tokens')::bigint, 0));
    -- Keep the newest p_history_versions versions (0: all): every version stores the whole
    -- memory, so unbounded history grows with versions x memory size.
    -- Only once the chat has more versions than that: the statement cost a third of a finish
    -- when run for every chat.
    IF p_history_versions > 0 AND old.version + 1 > p_history_versions THEN
        DELETE FROM memory.chat_memory_history h
         WHERE h.chat_id = p_chat_id AND h.version <= old.version + 1 - p_history_versions;
    END IF;
    RETURN true;
END
$$;

-- Snippets the summarizer refused on their own (one too long for the model's context, say):
-- 'failed' at once with their error, without holding back the chat's other snippets.
CREATE FUNCTION memory._finish_dead(p_chat_id text, p_lease_token uuid, p_dead jsonb)
RETURNS int
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_n int;
BEGIN
    UPDATE memory.chat_context_queue q
       SET status = 'failed', retry_count = q.retry_count + 1, processed_at = now(),
           error_message = left(d.error, 2000), error_public = memory._public_error(d.kind),
           claim_token = NULL, lease_expires_at = NULL
      FROM jsonb_to_recordset(coalesce(p_dead, '[]')) AS d(id uuid, error text, kind text)
     WHERE q.id = d.id AND q.chat_id = p_chat_id AND q.status = 'processing'
       AND q.claim_token = p_lease_token;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END
$$;

-- Give a lease back without counting an attempt: the worker is stopping while the chat's LLM
-- request is still in flight. Its snippets are pending again, due at once. A chat a client holds
-- locked is left alone (the worker must not wait on it): its lease expires and is reclaimed.
CREATE FUNCTION memory._release(p_chat_id text, p_lease_token uuid)
RETURNS int
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM 1 FROM memory.chat_metadata c
     WHERE c.chat_id = p_chat_id AND c.lease_token = p_lease_token FOR NO KEY UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    RETURN memory._return_claimed(p_chat_id, false, false, NULL, NULL, 1, now());
END
$$;

-- Take back leases whose holder is gone: expired ones, or (p_dead_owners) ones held by a
-- process that no longer exists, e.g. after a crash or on a promoted standby. A process is its
-- pid and start time, since pids are reused. The attempt counts as failed, so a snippet that
-- kills its worker every time ends 'failed' instead of looping forever. Claimers run it first,
-- in the claim's transaction: a chat is claimed only once its old lease has been taken back.
CREATE FUNCTION memory._reclaim(p_max_attempts int, p_dead_owners bool)
RETURNS int
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_chat text;
    v_n int := 0;
BEGIN
    -- pg_stat_activity is read once per transaction: a process started since (a helper, in a
    -- caller's transaction of process_pending) would look dead
    IF p_dead_owners THEN
        PERFORM pg_catalog.pg_stat_clear_snapshot();
    END IF;
    FOR v_chat IN
        SELECT c.chat_id FROM memory.chat_metadata c
         WHERE c.lease_token IS NOT NULL
           AND (c.lease_until < now()
                OR (p_dead_owners AND c.lease_owner <> pg_backend_pid()
                    AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a
                                     WHERE a.pid = c.lease_owner
                                       AND a.backend_start = c.lease_owner_start)))
         ORDER BY c.chat_id
           FOR NO KEY UPDATE OF c SKIP LOCKED
    LOOP
        v_n := v_n + memory._return_claimed(v_chat, true, false,
            'lease expired: the process summarizing this snippet stopped or took longer than '
            'memory_ext.lease_timeout', 'lease', p_max_attempts, now());
    END LOOP;
    RETURN v_n;
END
$$;

-- Delete up to p_batch complete rows older than the retention period (NULL: none, under
-- memory_ext.keep_applied_snippets), and up to p_batch audit rows older than the audit
-- retention; returns how many rows were deleted. A chat that loses an applied snippet is marked
-- pruned (its memory can no longer be re-derived); rows of a chat a client holds locked wait for
-- the next round (the worker never waits for a client's lock).
CREATE FUNCTION memory._cleanup(p_retention_seconds int, p_batch int,
                                p_audit_retention_seconds int DEFAULT NULL)
RETURNS int
LANGUAGE sql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH old AS (
        SELECT q.id, q.chat_id FROM memory.chat_context_queue q
         WHERE q.status = 'complete'
           AND q.processed_at < now() - make_interval(secs => p_retention_seconds)
         ORDER BY q.processed_at LIMIT p_batch
           FOR UPDATE SKIP LOCKED
    ), chats AS (
        SELECT m.chat_id FROM memory.chat_metadata m
         WHERE m.chat_id IN (SELECT old.chat_id FROM old)
           FOR NO KEY UPDATE SKIP LOCKED
    ), pruned AS (
        UPDATE memory.chat_metadata m SET pruned_at = now()
          FROM chats WHERE m.chat_id = chats.chat_id AND m.pruned_at IS NULL
    ), gone AS (
        DELETE FROM memory.chat_context_queue q USING old, chats
         WHERE q.id = old.id AND old.chat_id = chats.chat_id RETURNING 1
    ), old_audit AS (
        SELECT a.ctid FROM memory.audit_log a
         WHERE p_audit_retention_seconds IS NOT NULL
           AND a.at < now() - make_interval(secs => p_audit_retention_seconds)
         LIMIT p_batch
    ), gone_audit AS (
        DELETE FROM memory.audit_log a USING old_audit WHERE a.ctid = old_audit.ctid RETURNING 1
    ), gone_turns AS (
        -- owners not served for a day: they simply rank as never served. Locked in owner order,
        -- skipping rows a claim holds (claims upsert them in that order: no deadlock, no wait)
        DELETE FROM memory.owner_turns t
         WHERE t.owner IN (SELECT o.owner FROM memory.owner_turns o
                            WHERE o.served_at < now() - interval '1 day'
                            ORDER BY o.owner FOR UPDATE SKIP LOCKED)
        RETURNING 1
    )
    SELECT ((SELECT count(*) FROM gone) + (SELECT count(*) FROM gone_audit)
            + (SELECT count(*) FROM gone_turns))::int
$$;

-- When the worker must look again even if nobody wakes it: the next chat coming due (a backoff
-- ending) or lease expiry. NULL when nothing is scheduled.
CREATE FUNCTION memory._next_due()
RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT least(
        (SELECT min(m.due_at) FROM memory.chat_metadata m
          WHERE m.due_at IS NOT NULL AND m.lease_token IS NULL),
        (SELECT min(m.lease_until) FROM memory.chat_metadata m WHERE m.lease_token IS NOT NULL))
$$;

REVOKE ALL ON FUNCTION memory._due_chats(int), memory._claim(int, int, int),
    memory._peek(int, int),
    memory._claim_exact(text, bigint, uuid[], int),
    memory._finish(jsonb, text, int, int, int, int),
    memory._finish_applied(text, uuid, uuid[], jsonb, jsonb, text, int, bool, text, jsonb, int,
                           text, int),
    memory._finish_dead(text, uuid, jsonb), memory._backoff_until(text, uuid, int, int, int),
    memory._usage_sum(bigint[], jsonb),
    memory._return_claimed(text, bool, bool, text, text, int, timestamptz),
    memory._public_error(text),
    memory._release(text, uuid), memory._reclaim(int, bool),
    memory._record_usage(text, int, int, bigint, bigint, bigint, bigint, bigint, bigint),
    memory._cleanup(int, int, int), memory._next_due() FROM PUBLIC;
