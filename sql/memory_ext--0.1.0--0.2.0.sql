-- memory_ext 0.1.0 -> 0.2.0, run by `ALTER EXTENSION memory_ext UPDATE` (as a superuser, with
-- the 0.2.0 library installed and the server restarted; the 0.2.0 worker waits for this update).
--
-- Every row is kept. What changes:
-- - chat_metadata.due_at (fair claiming; the queue's due and lease indexes go), rebuild and
--   pruned_at (memory.rebuild(), forget_snippet()), history.rebuilt, tables owner_usage_daily and
--   owner_budgets (per-owner daily token budgets),
--   chat_context_queue.error_public (what owners see of an error) and applied_before
--   (forget_snippet()), table owner_turns (owners take turns), table fact_keys (declared fact keys), and
--   memory.watch() (capture from an app's own table, with table capture_inbox).
-- - Identities of direct callers move to their own namespace: an owner or enqueued_by naming an
--   existing role becomes 'role:<name>' (0.1.0 stored a role's name as it was, in the namespace
--   of JWT subs). A JWT sub equal to a role's name is taken for that role.
-- - The lease protocol's functions (_claim, _finish, _return_claimed, ...) replace _apply and _fail;
--   every function is replaced by its 0.2.0 definition.
-- - Roles given grant_usage()/grant_admin() get the privileges these now include.
\echo Use "ALTER EXTENSION memory_ext UPDATE TO '0.2.0'" to load this file. \quit

-- Who was granted at CREATE EXTENSION (the owner; Supabase's roles where they existed), read
-- before this script's grants change what pg_init_privs says (see "privileges" at the end).
SELECT pg_catalog.set_config('memory_ext_upgrade.initial_grantees',
    (SELECT pg_catalog.string_agg(DISTINCT a.grantee::text, ',')
       FROM pg_catalog.pg_init_privs i, pg_catalog.aclexplode(i.initprivs) a
      WHERE i.objoid = 'memory.enqueue(text, text, text)'::regprocedure
        AND i.classoid = 'pg_catalog.pg_proc'::regclass), true);

-- ---- tables ---------------------------------------------------------------------------------
ALTER TABLE memory.chat_metadata ADD COLUMN due_at timestamptz,
    ADD COLUMN context_text text, ADD COLUMN context_tokens int;
CREATE INDEX chat_metadata_due_idx ON memory.chat_metadata (due_at) WHERE due_at IS NOT NULL;
ALTER TABLE memory.chat_context_queue ADD COLUMN error_public text,
    ADD COLUMN applied_before bool NOT NULL DEFAULT false;
ALTER TABLE memory.chat_memory_history ADD COLUMN restored_version bigint;
-- what providers served from their prompt cache (read), and wrote to it (Anthropic)
ALTER TABLE memory.chat_memory_history ADD COLUMN cached_prompt_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN cache_write_tokens bigint NOT NULL DEFAULT 0;
ALTER TABLE memory.llm_usage_daily ADD COLUMN cached_prompt_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN cache_write_tokens bigint NOT NULL DEFAULT 0;
-- claims and reclaims read chat_metadata (due_at, lease_until): these only cost every write
DROP INDEX memory.chat_context_queue_due_idx, memory.chat_context_queue_lease_idx;
CREATE TABLE memory.owner_turns (
    owner       text PRIMARY KEY,
    served_at   timestamptz NOT NULL
);
CREATE TABLE memory.fact_keys (
    key          text PRIMARY KEY
                 CONSTRAINT fact_keys_key_check CHECK (key ~ '^[a-z][a-z0-9_]{0,63}$'),
    description  text NOT NULL DEFAULT ''
                 CONSTRAINT fact_keys_description_check CHECK (length(description) <= 500),
    may_confirm  bool NOT NULL DEFAULT true,
    may_infer    bool NOT NULL DEFAULT true,
    CONSTRAINT fact_keys_some_use_check CHECK (may_confirm OR may_infer)
);
SELECT pg_catalog.pg_extension_config_dump('memory.fact_keys', '');
-- re-derivation (memory.rebuild(), forget_snippet()) and per-owner token budgets
ALTER TABLE memory.chat_metadata ADD COLUMN rebuild jsonb, ADD COLUMN pruned_at timestamptz;
ALTER TABLE memory.chat_memory_history ADD COLUMN rebuilt bool NOT NULL DEFAULT false;
CREATE TABLE memory.owner_usage_daily (
    day                 date NOT NULL,
    owner               text NOT NULL,
    llm_requests        bigint NOT NULL DEFAULT 0,
    prompt_tokens       bigint NOT NULL DEFAULT 0,
    completion_tokens   bigint NOT NULL DEFAULT 0
);
CREATE INDEX owner_usage_daily_day_owner_idx ON memory.owner_usage_daily (day, owner);
CREATE TABLE memory.owner_budgets (
    owner         text PRIMARY KEY CHECK (btrim(owner) <> ''),
    daily_tokens  bigint NOT NULL CHECK (daily_tokens >= 0),
    set_at        timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('memory.owner_usage_daily', '');
SELECT pg_catalog.pg_extension_config_dump('memory.owner_budgets', '');
-- Rows captured from watched tables (memory.watch) whose chat exists and is theirs: each drew
-- its seq under the chat's KEY SHARE lock, as enqueue() does, but is written here, one heap row
-- and one index entry, rather than into the queue (three indexes, the foreign key, the status
-- check, an audit row). Whoever takes a chat FOR UPDATE to claim it, or to end a lease, moves the
-- chat's captured rows into the queue first (memory._take_captured), keeping id and seq, and
-- audits them then: so every rule of the queue holds for them as if enqueued. get() and
-- context() count them as pending; forget() erases them.
CREATE TABLE memory.capture_inbox (
    id              uuid NOT NULL DEFAULT gen_random_uuid(),
    -- drawn by the capture's INSERT, a statement after the one that locked the chat row
    seq             bigint NOT NULL DEFAULT nextval('memory.chat_context_queue_seq'),
    chat_id         text NOT NULL,
    snippet         text NOT NULL,
    source          text NOT NULL,
    enqueued_by     text NOT NULL,
    -- who inserted it (NULL: no identity) and as which role, for the audit row written when
    -- the row is moved
    identity        text,
    role            name NOT NULL,
    captured_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    next_attempt_at timestamptz NOT NULL
);
CREATE INDEX capture_inbox_chat_idx ON memory.capture_inbox (chat_id, seq);
SELECT pg_catalog.pg_extension_config_dump('memory.capture_inbox', '');

-- ---- functions that are gone or whose arguments changed (with what uses them) ---------------
DROP POLICY owner_reads ON memory.chat_context_queue;
DROP POLICY owner_reads ON memory.chat_memory_history;
DROP FUNCTION memory._claim(int, int, int, text[]);
DROP FUNCTION memory._record_usage(text, int, int, bigint, bigint, bigint, bigint);
DROP FUNCTION memory._apply(jsonb, text);
DROP FUNCTION memory._fail(text, uuid, text, bool, int, int, int, int, text, jsonb);
DROP FUNCTION memory._chat_owner(text);
DROP FUNCTION memory._owned_chat(text);

-- ---- every function as 0.2.0 defines it ------------------------------------------------------

-- Claiming and applying work. Called by the worker (and process_pending) from Rust, which owns
-- summarizing and the merge rules; these functions own every row movement. Internal: no caller
-- but the extension's own code should run them.

-- Candidate chats for a claim of up to p_max_chats, best first (ord). Fair by construction:
-- - a chat is one row however long its backlog, and a leased chat is no candidate at all;
-- - owners take turns: each owner's first chat (by due_at) comes before anyone's second, and
--   among those the owner served longest ago (owner_turns) comes first;
-- so a due chat of an owner with no chat in flight is claimed at the next claim with a free
-- slot, whatever other owners have queued. Ranked among the oldest 10,000 due chats.
CREATE OR REPLACE FUNCTION memory._due_chats(p_max_chats int)
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
-- Returns each leased chat's current memory and its snippets in enqueue order.
--
-- A chat with a lease, even an expired one, is never claimed: _reclaim (which callers run first,
-- in the same transaction) ends stale leases and returns their rows. The chat row is locked FOR
-- UPDATE, which conflicts with the KEY SHARE lock enqueue takes before it draws a seq, so no
-- enqueue into a claimed chat is in progress: every row with a lower seq is visible, and the
-- claimed rows are exactly the chat's oldest.
CREATE OR REPLACE FUNCTION memory._claim(p_max_chats int, p_max_snippets int, p_lease_seconds int)
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
CREATE OR REPLACE FUNCTION memory._peek(p_max_chats int, p_max_snippets int)
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
CREATE OR REPLACE FUNCTION memory._claim_exact(p_chat_id text, p_version bigint, p_ids uuid[],
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
CREATE OR REPLACE FUNCTION memory._record_usage(p_summarizer text, p_applied int, p_failed int,
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
CREATE OR REPLACE FUNCTION memory._public_error(p_kind text)
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
-- would skip the NULL and answer p_due, marking every finished chat due again).
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
-- is claimed before it (backoff), newer rows included, so order is kept.
CREATE OR REPLACE FUNCTION memory._return_claimed(p_chat_id text, p_count_attempt bool, p_permanent bool,
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
CREATE OR REPLACE FUNCTION memory._finish(p_results jsonb, p_summarizer text, p_max_attempts int,
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
CREATE OR REPLACE FUNCTION memory._backoff_until(p_chat_id text, p_lease_token uuid, p_retry_after_ms int,
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
CREATE OR REPLACE FUNCTION memory._finish_applied(p_chat_id text, p_lease_token uuid, p_ids uuid[],
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
CREATE OR REPLACE FUNCTION memory._finish_dead(p_chat_id text, p_lease_token uuid, p_dead jsonb)
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
CREATE OR REPLACE FUNCTION memory._release(p_chat_id text, p_lease_token uuid)
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
CREATE OR REPLACE FUNCTION memory._reclaim(p_max_attempts int, p_dead_owners bool)
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

-- Delete up to p_batch complete rows older than the retention period, and up to p_batch audit
-- rows older than the audit retention; returns how many rows were deleted.
CREATE OR REPLACE FUNCTION memory._cleanup(p_retention_seconds int, p_batch int,
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
CREATE OR REPLACE FUNCTION memory._next_due()
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

CREATE OR REPLACE FUNCTION "_admin_role"() RETURNS TEXT /* String */
STRICT STABLE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'admin_role_wrapper';

CREATE OR REPLACE FUNCTION "_audit_reads"() RETURNS bool /* bool */
STRICT STABLE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'audit_reads_wrapper';

-- new in 0.2.0: memory_ext.debounce and debounce_max, for the SQL that marks chats due
CREATE FUNCTION "_debounce_max_ms"() RETURNS INT /* i32 */
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'debounce_max_ms_wrapper';

CREATE FUNCTION "_debounce_ms"() RETURNS INT /* i32 */
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'debounce_ms_wrapper';

CREATE OR REPLACE FUNCTION "_max_snippet_bytes"() RETURNS INT /* i32 */
STRICT STABLE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'max_snippet_bytes_wrapper';

CREATE OR REPLACE FUNCTION "_note_denied"(
	"p_action" TEXT, /* & str */
	"p_chat_id" TEXT, /* & str */
	"p_identity" TEXT, /* & str */
	"p_role" TEXT /* & str */
) RETURNS void
STRICT VOLATILE PARALLEL UNSAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'note_denied_wrapper';

CREATE OR REPLACE FUNCTION "_rate_limit"(
	"identity" TEXT /* & str */
) RETURNS INT /* i32 */
STRICT VOLATILE PARALLEL UNSAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'rate_limit_wrapper';

CREATE OR REPLACE FUNCTION "_superuser"() RETURNS bool /* bool */
STRICT STABLE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'current_user_is_superuser_wrapper';

CREATE OR REPLACE FUNCTION "_token_limit"() RETURNS INT /* i32 */
STRICT STABLE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'token_limit_wrapper';

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
-- current_identity() and _invoker() sit on every hot path, so they are SQL-standard bodies
-- (BEGIN ATOMIC / RETURN): parsed and bound to their objects at CREATE time, so the caller's
-- search_path cannot redirect them, and they need no SET clause (which would cost a
-- search_path switch on every call).
CREATE OR REPLACE FUNCTION memory._invoker()
RETURNS name
LANGUAGE sql STABLE PARALLEL SAFE
RETURN coalesce(nullif(pg_catalog.current_setting('role'), 'none'), session_user)::name;

-- The JWT `sub` claim PostgREST/Supabase put in request.jwt.claims (trimmed), or NULL.
CREATE OR REPLACE FUNCTION memory._jwt_sub()
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
RETURN nullif(pg_catalog.btrim(
    nullif(pg_catalog.current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub'), '');

-- The caller, in one of two namespaces that never collide: the JWT `sub` claim as it is, or
-- `role:<name>` for the invoking role (a direct connection, or a JWT without a usable sub). A
-- `sub` that itself starts with `role:` is no identity (NULL): it could pose as a role.
-- 0.2.0 computes it in Rust (src/identity.rs): as an inlined expression, plpgsql compiled it
-- anew in every transaction of every hot path.
CREATE OR REPLACE FUNCTION memory."current_identity"() RETURNS TEXT /* Option < String > */
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'current_identity_wrapper';

-- new in 0.2.0: the catalog part of _is_admin(), which 0.1.0's _is_admin() was
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

-- 0.2.0: in Rust (src/identity.rs), for the rest
CREATE OR REPLACE FUNCTION memory."_is_admin"() RETURNS bool /* bool */
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'is_admin_wrapper';

-- Why the caller may not create chats, or NULL. A request that carries JWT claims but no usable
-- `sub` would otherwise act as its role (every such user sharing `role:authenticated`): refused
-- unless an admin (a backend with the service role). A `sub` posing as a role is refused too.
CREATE OR REPLACE FUNCTION memory._identity_problem()
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
CREATE OR REPLACE FUNCTION memory._require_identity()
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
CREATE OR REPLACE FUNCTION memory._audit(p_action text, p_chat_id text DEFAULT NULL,
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
CREATE OR REPLACE FUNCTION memory._owns_chat(p_chat_id text)
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
CREATE OR REPLACE FUNCTION memory._require_admin(p_what text)
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

-- new in 0.2.0: the rules, which the Rust check below asks for ids that are not plain ASCII
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

-- new in 0.2.0: the check on every hot path, in Rust (src/chat_id.rs), asking the rules above
CREATE FUNCTION memory."_chat_id_problem"(
	"p_chat_id" TEXT /* Option < & str > */
) RETURNS TEXT /* Option < String > */
STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'chat_id_problem_wrapper';

CREATE OR REPLACE FUNCTION memory._check_chat_id(p_chat_id text)
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
CREATE OR REPLACE FUNCTION memory._refuse(p_action text, p_chat_id text, p_errcode text, p_message text)
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
CREATE OR REPLACE FUNCTION memory._owned_chat(p_chat_id text, p_action text DEFAULT 'access')
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
CREATE OR REPLACE FUNCTION memory._raise_rate_limited(p_wait int)
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
CREATE OR REPLACE FUNCTION memory._take_rate_token(p_identity text)
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

CREATE OR REPLACE FUNCTION memory.create_chat(p_chat_id text)
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

CREATE OR REPLACE FUNCTION memory.enqueue(p_chat_id text, p_snippet text, p_trigger_source text DEFAULT 'api')
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
CREATE OR REPLACE FUNCTION memory.get(p_chat_id text)
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

CREATE OR REPLACE FUNCTION memory.status(p_queue_id uuid)
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
CREATE OR REPLACE FUNCTION memory._queue_row_xmin(p_queue_id uuid)
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

CREATE OR REPLACE FUNCTION memory.history(p_chat_id text)
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
CREATE OR REPLACE FUNCTION memory.forget(p_chat_id text)
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
CREATE OR REPLACE FUNCTION memory.retry_failed(p_chat_id text DEFAULT NULL)
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

CREATE OR REPLACE VIEW memory.queue_stats AS
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
CREATE OR REPLACE VIEW memory.llm_usage AS
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

CREATE OR REPLACE FUNCTION "_wake_at_commit"() RETURNS interval /* Option < Interval > */
STRICT VOLATILE PARALLEL UNSAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'wake_at_commit_wrapper';

-- new in 0.2.0: the memory as prompt text (memory.context() renders with it when it must)
CREATE FUNCTION "_render_context"(
	"p_confirmed" jsonb, /* Option < pgrx :: JsonB > */
	"p_inferred" jsonb, /* Option < pgrx :: JsonB > */
	"p_summary" TEXT, /* Option < & str > */
	"p_guidance" TEXT, /* Option < & str > */
	"p_max_tokens" INT /* Option < i32 > */
) RETURNS TABLE (
	"context" TEXT,  /* String */
	"token_count" INT,  /* i32 */
	"truncated" bool  /* bool */
)
IMMUTABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'render_context_wrapper';

CREATE OR REPLACE FUNCTION "count_tokens"(
	"text" TEXT /* & str */
) RETURNS INT /* i32 */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'count_tokens_wrapper';

CREATE OR REPLACE FUNCTION "process_pending"(
	"p_max" INT DEFAULT 100 /* i32 */
) RETURNS INT /* i32 */
STRICT VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'process_pending_wrapper';

CREATE OR REPLACE FUNCTION "wait"(
	"p_queue_id" uuid, /* pgrx :: Uuid */
	"p_timeout" interval DEFAULT '10 seconds' /* Interval */
) RETURNS TEXT /* String */
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'wait_wrapper';

CREATE OR REPLACE FUNCTION "worker_status"() RETURNS TABLE (
	"running" bool,  /* bool */
	"pid" INT,  /* Option < i32 > */
	"database" TEXT,  /* Option < String > */
	"started_at" timestamp with time zone,  /* Option < TimestampWithTimeZone > */
	"last_heartbeat" timestamp with time zone,  /* Option < TimestampWithTimeZone > */
	"processed" bigint,  /* i64 */
	"failed" bigint,  /* i64 */
	"last_error" TEXT,  /* Option < String > */
	"state" TEXT  /* String */
)
STRICT VOLATILE PARALLEL SAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'worker_status_wrapper';

CREATE OR REPLACE FUNCTION memory._usage_functions()
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

CREATE OR REPLACE FUNCTION memory._admin_functions()
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

CREATE OR REPLACE FUNCTION memory._grant_functions(p_grant bool, p_functions regprocedure[], p_role regrole)
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

CREATE OR REPLACE FUNCTION memory._check_role(p_role regrole)
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

CREATE OR REPLACE FUNCTION memory._grant_usage(p_role regrole)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA memory TO %s', p_role);
    PERFORM memory._grant_functions(true, memory._usage_functions(), p_role);
END
$$;

CREATE OR REPLACE FUNCTION memory.grant_usage(p_role regrole)
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

CREATE OR REPLACE FUNCTION memory.revoke_usage(p_role regrole)
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

CREATE OR REPLACE FUNCTION memory._grant_admin_privileges(p_role regrole)
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

CREATE OR REPLACE FUNCTION memory.grant_admin(p_role regrole)
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

CREATE OR REPLACE FUNCTION memory.revoke_admin(p_role regrole)
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

CREATE OR REPLACE FUNCTION memory._audit_log_append_only()
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

CREATE OR REPLACE FUNCTION memory._audit_direct_write()
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

-- ---- new in 0.2.0: capture from the app's own tables (sql/watch.sql) ------------------------
CREATE FUNCTION "_trigger_args"(
	"args" bytea /* & [u8] */
) RETURNS TEXT[] /* Vec < String > */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'trigger_args_wrapper';

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

-- ---- new in 0.2.0: per-owner token budgets (sql/budget.sql) ----------------------------------
CREATE FUNCTION "_owner_daily_tokens"() RETURNS bigint /* i64 */
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'owner_daily_tokens_wrapper';

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


-- ---- new in 0.2.0: rollback, rebuild and erasure (sql/lifecycle.sql) ------------------------
CREATE FUNCTION "_count_memory"(
	"p_confirmed" jsonb, /* Option < pgrx :: JsonB > */
	"p_inferred" jsonb, /* Option < pgrx :: JsonB > */
	"p_summary" TEXT /* Option < & str > */
) RETURNS INT /* i32 */
IMMUTABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'count_memory_wrapper';

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


-- ---- row level security, triggers ------------------------------------------------------------
CREATE POLICY owner_reads ON memory.chat_context_queue FOR SELECT
    USING (memory._owns_chat(chat_id));
CREATE POLICY owner_reads ON memory.chat_memory_history FOR SELECT
    USING (memory._owns_chat(chat_id));
ALTER TABLE memory.owner_turns ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_reads ON memory.owner_turns FOR SELECT USING (memory._is_admin());
ALTER TABLE memory.fact_keys ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_all ON memory.fact_keys FOR ALL
    USING (memory._is_admin()) WITH CHECK (memory._is_admin());
ALTER TABLE memory.owner_usage_daily ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_reads ON memory.owner_usage_daily FOR SELECT USING (memory._is_admin());
ALTER TABLE memory.owner_budgets ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_reads ON memory.owner_budgets FOR SELECT USING (memory._is_admin());

ALTER TABLE memory.capture_inbox ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_reads ON memory.capture_inbox FOR SELECT USING (memory._is_admin());

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

-- ---- data ------------------------------------------------------------------------------------
UPDATE memory.chat_metadata m SET owner = 'role:' || m.owner
 WHERE m.owner IN (SELECT r.rolname FROM pg_catalog.pg_roles r);
UPDATE memory.chat_context_queue q SET enqueued_by = 'role:' || q.enqueued_by
 WHERE q.enqueued_by IN (SELECT r.rolname FROM pg_catalog.pg_roles r);
-- chats with pending snippets are claim candidates from their first due snippet on
UPDATE memory.chat_metadata m SET due_at = greatest(p.first_due, m.retry_at)
  FROM (SELECT q.chat_id, min(q.next_attempt_at) AS first_due FROM memory.chat_context_queue q
         WHERE q.status = 'pending_summarization' GROUP BY q.chat_id) p
 WHERE m.chat_id = p.chat_id;
-- 0.1.0's retention deleted applied snippets: a chat whose history does not go back to its first
-- version, or lists a snippet that is gone, can no longer be re-derived (rebuild, forget_snippet)
UPDATE memory.chat_metadata m SET pruned_at = now()
 WHERE m.version > 0
   AND (NOT EXISTS (SELECT 1 FROM memory.chat_memory_history h
                     WHERE h.chat_id = m.chat_id AND h.version = 1)
        OR EXISTS (SELECT 1 FROM memory.chat_memory_history h, unnest(h.queue_ids) AS u(id)
                    WHERE h.chat_id = m.chat_id
                      AND NOT EXISTS (SELECT 1 FROM memory.chat_context_queue q
                                       WHERE q.id = u.id)));
-- 0.1.0 did not record an error's class: owners are told the generic one
UPDATE memory.chat_context_queue q SET error_public = memory._public_error(NULL)
 WHERE q.error_message IS NOT NULL;

-- ---- privileges ------------------------------------------------------------------------------
-- New objects: nothing for PUBLIC.
REVOKE ALL ON memory.owner_turns, memory.fact_keys, memory.owner_usage_daily,
    memory.owner_budgets, memory.owner_usage, memory.capture_inbox FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA memory FROM PUBLIC;

-- Roles that had the API or admin rights get what grant_usage()/grant_admin() include in 0.2.0.
-- Grants made in an extension script are recorded as the objects' initial privileges, which
-- pg_dump leaves out: those of roles granted after CREATE EXTENSION are taken out again below,
-- so a dump of the updated database keeps them, as it does after a fresh 0.2.0 install.
DO $$
DECLARE
    r regrole;
BEGIN
    FOR r IN SELECT DISTINCT a.grantee::regrole
               FROM pg_catalog.pg_proc p, aclexplode(p.proacl) a
              WHERE p.oid = 'memory.enqueue(text, text, text)'::regprocedure
                AND a.grantee <> 0 AND a.grantee <> p.proowner LOOP
        PERFORM memory._grant_usage(r);
    END LOOP;
    FOR r IN SELECT DISTINCT a.grantee::regrole
               FROM pg_catalog.pg_proc p, aclexplode(p.proacl) a
              WHERE p.oid = 'memory.process_pending(integer)'::regprocedure
                AND a.grantee <> 0 AND a.grantee <> p.proowner LOOP
        PERFORM memory._grant_admin_privileges(r);
    END LOOP;
END
$$;
WITH initial AS (
    SELECT x::oid AS grantee
      FROM unnest(string_to_array(current_setting('memory_ext_upgrade.initial_grantees'), ',')) x
), members AS (
    SELECT d.classid, d.objid FROM pg_catalog.pg_depend d, pg_catalog.pg_extension e
     WHERE d.refclassid = 'pg_catalog.pg_extension'::regclass AND d.refobjid = e.oid
       AND d.deptype = 'e' AND e.extname = 'memory_ext'
    UNION ALL  -- the schema CREATE EXTENSION made
    SELECT 'pg_catalog.pg_namespace'::regclass, e.extnamespace FROM pg_catalog.pg_extension e
     WHERE e.extname = 'memory_ext'
)
UPDATE pg_catalog.pg_init_privs i
   SET initprivs = (SELECT coalesce(array_agg(x.item ORDER BY x.n), '{}')
                      FROM unnest(i.initprivs) WITH ORDINALITY x(item, n)
                     WHERE (SELECT a.grantee FROM aclexplode(ARRAY[x.item]) a LIMIT 1)
                           IN (SELECT grantee FROM initial))
 WHERE i.privtype = 'e'
   AND (i.classoid, i.objoid) IN (SELECT classid, objid FROM members)
   AND EXISTS (SELECT 1 FROM unnest(i.initprivs) x(item), aclexplode(ARRAY[x.item]) a
                WHERE a.grantee NOT IN (SELECT grantee FROM initial));
