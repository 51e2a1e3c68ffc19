-- Per-owner daily token budgets: an owner whose chats spent their LLM tokens for the UTC day has
-- their chats deferred (not failed) to the next UTC day; enqueue keeps accepting.
--
-- Checked when chats are claimed: a batch already in flight when an owner crosses the budget is
-- still applied, so an owner may overshoot by one summarization per chat in that batch.

-- Today, and when it ends, in UTC: budgets follow one clock whatever the server's TimeZone.
CREATE FUNCTION memory._utc_today()
RETURNS date
LANGUAGE sql STABLE PARALLEL SAFE
RETURN (pg_catalog.now() AT TIME ZONE 'UTC')::date;

CREATE FUNCTION memory._utc_tomorrow()
RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE
RETURN ((pg_catalog.now() AT TIME ZONE 'UTC')::date + 1)::timestamp AT TIME ZONE 'UTC';

-- What a deferred snippet's owner is told (error_public); set_owner_budget() finds deferred chats
-- by it.
CREATE FUNCTION memory._budget_deferred_message()
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 'deferred: the daily LLM token budget is spent; summarizing resumes on the next UTC day';

-- Add one summarization's LLM usage to its chat owner's day (in _finish, with the batch): to a
-- row of that day it can lock without waiting, else as a new row.
CREATE FUNCTION memory._record_owner_usage(p_chat_id text, p_usage jsonb)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_owner text;
    v_requests bigint := coalesce((p_usage ->> 'llm_requests')::bigint, 0);
    v_prompt bigint := coalesce((p_usage ->> 'prompt_tokens')::bigint, 0);
    v_completion bigint := coalesce((p_usage ->> 'completion_tokens')::bigint, 0);
BEGIN
    SELECT m.owner INTO v_owner FROM memory.chat_metadata m WHERE m.chat_id = p_chat_id;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    UPDATE memory.owner_usage_daily u
       SET llm_requests = u.llm_requests + v_requests, prompt_tokens = u.prompt_tokens + v_prompt,
           completion_tokens = u.completion_tokens + v_completion
     WHERE u.ctid = (SELECT x.ctid FROM memory.owner_usage_daily x
                      WHERE x.day = memory._utc_today() AND x.owner = v_owner
                      LIMIT 1 FOR UPDATE SKIP LOCKED);
    IF NOT FOUND THEN
        INSERT INTO memory.owner_usage_daily (day, owner, llm_requests, prompt_tokens,
                                              completion_tokens)
        VALUES (memory._utc_today(), v_owner, v_requests, v_prompt, v_completion);
    END IF;
END
$$;

-- Each owner's usage today, summed.
CREATE FUNCTION memory._owner_usage_today()
RETURNS TABLE (owner text, llm_requests bigint, prompt_tokens bigint, completion_tokens bigint)
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT u.owner, sum(u.llm_requests)::bigint, sum(u.prompt_tokens)::bigint,
           sum(u.completion_tokens)::bigint
      FROM memory.owner_usage_daily u WHERE u.day = memory._utc_today()
     GROUP BY u.owner
$$;

-- An owner's budget: their override, else p_default (memory_ext.owner_daily_tokens); NULL when
-- unlimited (0).
CREATE FUNCTION memory._owner_budget(p_owner text, p_default bigint)
RETURNS bigint
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT nullif(coalesce((SELECT b.daily_tokens FROM memory.owner_budgets b
                             WHERE b.owner = p_owner), p_default), 0)
$$;

-- Before a claim (same transaction): the due chats of owners whose tokens today reached their
-- budget are deferred to the next UTC day, their pending snippets saying why. Chats a client
-- holds locked are left for the next claim (the worker never waits for a client's lock).
-- Returns how many chats were deferred. Reads only today's usage rows: cheap when nobody spends.
CREATE FUNCTION memory._defer_over_budget(p_default bigint)
RETURNS int
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_until timestamptz := memory._utc_tomorrow();
    v_chats text[];
    v_n int;
BEGIN
    -- budgets off: nothing to read (this runs before every claim)
    IF p_default = 0 AND NOT EXISTS (SELECT 1 FROM memory.owner_budgets) THEN
        RETURN 0;
    END IF;
    -- The chats, locked; their captured rows into the queue first, so that those are held and
    -- marked too.
    SELECT array_agg(x.chat_id) INTO v_chats
      FROM (SELECT m.chat_id FROM memory.chat_metadata m
              JOIN memory._owner_usage_today() u ON u.owner = m.owner
             WHERE u.prompt_tokens + u.completion_tokens
                   >= memory._owner_budget(u.owner, p_default)
               AND m.due_at <= now() AND m.lease_token IS NULL
               FOR NO KEY UPDATE OF m SKIP LOCKED) x;
    IF v_chats IS NULL THEN
        RETURN 0;
    END IF;
    PERFORM memory._take_captured(v_chats);
    WITH over AS (
        SELECT u.owner, u.prompt_tokens + u.completion_tokens AS spent,
               memory._owner_budget(u.owner, p_default) AS budget
          FROM memory._owner_usage_today() u
    ), chats AS (
        SELECT m.chat_id, over.spent, over.budget
          FROM memory.chat_metadata m JOIN over ON over.owner = m.owner
         WHERE m.chat_id = ANY (v_chats)
    ), deferred AS (
        UPDATE memory.chat_metadata m SET due_at = v_until, retry_at = v_until
          FROM chats WHERE m.chat_id = chats.chat_id
        RETURNING m.chat_id
    ), held AS (
        UPDATE memory.chat_context_queue q
           SET next_attempt_at = v_until,
               error_message = format('deferred until %s: the owner''s LLM tokens today (%s) '
                                      'reached their daily budget (%s)', v_until, chats.spent,
                                      chats.budget),
               error_public = memory._budget_deferred_message()
          FROM chats
         WHERE q.chat_id = chats.chat_id AND q.status = 'pending_summarization'
    )
    SELECT count(*) INTO v_n FROM deferred;
    RETURN v_n;
END
$$;

-- Set one owner's daily token budget (admins): p_daily_tokens replaces memory_ext.
-- owner_daily_tokens for them (0: no limit), NULL removes the override. Chats deferred for their
-- budget are due again at once (the next claim checks the new budget).
CREATE FUNCTION memory.set_owner_budget(p_owner text, p_daily_tokens bigint)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM memory._require_admin('memory.set_owner_budget()');
    IF p_owner IS NULL OR btrim(p_owner) = '' THEN
        RAISE EXCEPTION 'owner must not be null or blank' USING ERRCODE = '22023';
    END IF;
    IF p_daily_tokens < 0 THEN
        RAISE EXCEPTION 'daily_tokens must be 0 (no limit) or more, got %', p_daily_tokens
            USING ERRCODE = '22023';
    END IF;
    IF p_daily_tokens IS NULL THEN
        DELETE FROM memory.owner_budgets b WHERE b.owner = p_owner;
    ELSE
        INSERT INTO memory.owner_budgets AS b (owner, daily_tokens) VALUES (p_owner, p_daily_tokens)
        ON CONFLICT (owner) DO UPDATE SET daily_tokens = excluded.daily_tokens, set_at = now();
    END IF;
    -- The deferred chats (a pending snippet says so) are due now, with every pending snippet
    -- (those enqueued while deferred too) and without the reason: the next claim checks the new
    -- budget.
    WITH deferred AS (
        SELECT DISTINCT q.chat_id FROM memory.chat_context_queue q
          JOIN memory.chat_metadata m ON m.chat_id = q.chat_id
         WHERE m.owner = p_owner AND q.status = 'pending_summarization'
           AND q.error_public = memory._budget_deferred_message()
    ), resumed AS (
        UPDATE memory.chat_context_queue q
           SET next_attempt_at = least(q.next_attempt_at, now()),
               error_message = CASE WHEN q.error_public = memory._budget_deferred_message()
                                    THEN NULL ELSE q.error_message END,
               error_public = nullif(q.error_public, memory._budget_deferred_message())
          FROM deferred
         WHERE q.chat_id = deferred.chat_id AND q.status = 'pending_summarization'
    )
    UPDATE memory.chat_metadata m SET due_at = now(), retry_at = NULL
      FROM deferred WHERE m.chat_id = deferred.chat_id AND m.lease_token IS NULL;
    PERFORM memory._wake_at_commit();
    PERFORM memory._audit('set_owner_budget', NULL, NULL,
        format('%s: %s', p_owner, coalesce(p_daily_tokens::text, 'default')));
END
$$;

-- Who spends what today (UTC), against which budget, and who is throttled: every owner with
-- usage today or a budget of their own. Admins only.
CREATE VIEW memory.owner_usage AS
SELECT o.owner,
       memory._utc_today() AS day,
       coalesce(u.llm_requests, 0) AS llm_requests,
       coalesce(u.prompt_tokens, 0) AS prompt_tokens,
       coalesce(u.completion_tokens, 0) AS completion_tokens,
       coalesce(u.prompt_tokens + u.completion_tokens, 0) AS tokens,
       memory._owner_budget(o.owner, memory._owner_daily_tokens()) AS daily_budget,
       coalesce(u.prompt_tokens + u.completion_tokens, 0)
           >= memory._owner_budget(o.owner, memory._owner_daily_tokens()) IS TRUE AS throttled,
       (SELECT count(*) FROM memory.chat_metadata m
         WHERE m.owner = o.owner AND m.lease_token IS NULL AND m.due_at > now()
           AND EXISTS (SELECT 1 FROM memory.chat_context_queue q
                        WHERE q.chat_id = m.chat_id AND q.status = 'pending_summarization'
                          AND q.error_public = memory._budget_deferred_message())) AS deferred_chats
  FROM (SELECT x.owner FROM memory._owner_usage_today() x
        UNION SELECT b.owner FROM memory.owner_budgets b) o
  LEFT JOIN memory._owner_usage_today() u ON u.owner = o.owner;

REVOKE ALL ON FUNCTION memory._record_owner_usage(text, jsonb),
    memory._defer_over_budget(bigint) FROM PUBLIC;
