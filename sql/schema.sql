-- memory_ext schema: the chat memory record, the snippet queue and the change history.
-- Loaded first (bootstrap); the functions in api.sql and the Rust functions build on it.

-- One row per chat: the memory agents read, plus the lease/backoff state the worker needs to
-- keep at most one summarization per chat in flight.
CREATE TABLE memory.chat_metadata (
    chat_id         text PRIMARY KEY
                    CHECK (chat_id <> '' AND length(chat_id) <= 256),
    owner           text NOT NULL,
    user_confirmed  jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(user_confirmed) = 'object'),
    llm_inferred    jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(llm_inferred) = 'object'),
    general_summary text NOT NULL DEFAULT '',
    token_count     int NOT NULL DEFAULT 0,
    needs_new_chat  bool NOT NULL DEFAULT false,
    version         bigint NOT NULL DEFAULT 0,
    last_updated    timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- in-flight summarization: who holds the chat and until when (expired leases are reclaimed)
    lease_token     uuid,
    lease_owner     int,
    -- with lease_owner, identifies the holding process uniquely over time (pids get reused)
    lease_owner_start timestamptz,
    lease_until     timestamptz,
    -- backoff after a failed attempt: nothing of this chat is claimed before retry_at
    retry_at        timestamptz,
    -- when the chat has work to claim (NULL: none). Set by the first enqueue into an idle chat,
    -- put behind every waiting chat after each summarization (round robin), pushed to the
    -- backoff after a failure. Claims pick chats by it, so one chat's backlog is one candidate.
    due_at          timestamptz,
    -- the memory as memory.context() renders it (no budget, no guidance) and its exact token
    -- count, written with the memory by the worker: context() on the hot path is a read
    context_text    text,
    context_tokens  int,
    -- a re-derivation in progress (memory.rebuild(), forget_snippet()): the memory being rebuilt
    -- from the empty one, claims summarize onto it instead of the memory agents read, and it is
    -- applied as one new version once every snippet up to seq `upto` is settled.
    -- {upto, user_confirmed, llm_inferred, general_summary, ids, usage, summarizer}
    rebuild         jsonb,
    -- when retention first deleted an applied snippet of this chat: its memory can no longer be
    -- re-derived (rebuild, forget_snippet)
    pruned_at       timestamptz
);
CREATE INDEX chat_metadata_owner_idx ON memory.chat_metadata (owner);
-- Claiming: chats with work, in the order it came due.
CREATE INDEX chat_metadata_due_idx ON memory.chat_metadata (due_at) WHERE due_at IS NOT NULL;
-- Reclaiming looks only at chats in flight.
CREATE INDEX chat_metadata_leased_idx ON memory.chat_metadata (lease_until)
    WHERE lease_token IS NOT NULL;

-- The order of snippets within a chat is the order of this sequence (enqueue order).
CREATE SEQUENCE memory.chat_context_queue_seq;

CREATE TABLE memory.chat_context_queue (
    id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    seq                 bigint NOT NULL DEFAULT nextval('memory.chat_context_queue_seq'),
    chat_id             text NOT NULL REFERENCES memory.chat_metadata (chat_id) ON DELETE CASCADE,
    new_context_snippet text NOT NULL,
    status              text NOT NULL DEFAULT 'pending_summarization'
                        CHECK (status IN ('pending_summarization', 'processing', 'complete', 'failed')),
    trigger_source      text NOT NULL DEFAULT 'api',
    enqueued_by         text NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    claim_token         uuid,
    claimed_at          timestamptz,
    lease_expires_at    timestamptz,
    processed_at        timestamptz,
    retry_count         int NOT NULL DEFAULT 0,
    -- the last error in full, for admins: it may quote the LLM provider (a masked key, an
    -- organisation id, an upstream host)
    error_message       text,
    -- what the snippet's owner is told: the error's class only (memory._public_error)
    error_public        text,
    -- applied once, then failed when forget_snippet() re-derived its chat: erasing it later must
    -- treat it as applied (kept versions may hold its effects though none lists it any more)
    applied_before      bool NOT NULL DEFAULT false
);
ALTER SEQUENCE memory.chat_context_queue_seq OWNED BY memory.chat_context_queue.seq;

-- A chat's open work in order: claiming its snippets and get()'s pending count. Which chats are
-- due and which leases expired is read from chat_metadata (due_at, lease_until), one row per
-- chat: the queue needs no index of its own for either, and an enqueue writes three index
-- entries (this one, the primary key, chat_idx).
CREATE INDEX chat_context_queue_open_idx ON memory.chat_context_queue (chat_id, seq)
    WHERE status IN ('pending_summarization', 'processing');
-- Retention deletes old complete rows in small batches.
CREATE INDEX chat_context_queue_done_idx ON memory.chat_context_queue (processed_at)
    WHERE status = 'complete';
-- forget(), retry_failed() and the foreign key's cascade.
CREATE INDEX chat_context_queue_chat_idx ON memory.chat_context_queue (chat_id, status);

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

-- When each owner last had a chat claimed: claims serve the owners waiting longest first, so one
-- owner's many chats cannot hold back another owner's. Scheduling state only (not dumped).
CREATE TABLE memory.owner_turns (
    owner       text PRIMARY KEY,
    served_at   timestamptz NOT NULL
);

-- The fact keys an admin declared (none: free-form keys, as the summarizer chooses). With any
-- declared, operations on other keys, and confirmations (inferences) of a key that may not be
-- confirmed (inferred), are refused by the merge and counted in rejected_ops; the LLM prompt
-- lists the keys with their descriptions and the answer's schema allows only them.
CREATE TABLE memory.fact_keys (
    key          text PRIMARY KEY
                 CONSTRAINT fact_keys_key_check CHECK (key ~ '^[a-z][a-z0-9_]{0,63}$'),
    description  text NOT NULL DEFAULT ''
                 CONSTRAINT fact_keys_description_check CHECK (length(description) <= 500),
    may_confirm  bool NOT NULL DEFAULT true,
    may_infer    bool NOT NULL DEFAULT true,
    CONSTRAINT fact_keys_some_use_check CHECK (may_confirm OR may_infer)
);

-- Every applied version of a chat's memory, with the snippets that produced it.
CREATE TABLE memory.chat_memory_history (
    chat_id             text NOT NULL REFERENCES memory.chat_metadata (chat_id) ON DELETE CASCADE,
    version             bigint NOT NULL,
    queue_ids           uuid[] NOT NULL,
    old_user_confirmed  jsonb NOT NULL,
    old_llm_inferred    jsonb NOT NULL,
    old_general_summary text NOT NULL,
    user_confirmed      jsonb NOT NULL,
    llm_inferred        jsonb NOT NULL,
    general_summary     text NOT NULL,
    token_count         int NOT NULL,
    summarizer          text NOT NULL,
    -- what producing this version cost, as the LLM provider reported it (0 for the mock)
    llm_requests        int NOT NULL DEFAULT 0,
    prompt_tokens       bigint NOT NULL DEFAULT 0,
    completion_tokens   bigint NOT NULL DEFAULT 0,
    -- model operations refused by the extension (e.g. a confirmation quoting nothing it was given)
    rejected_ops        int NOT NULL DEFAULT 0,
    changed_at          timestamptz NOT NULL DEFAULT now(),
    -- a version made by memory.rollback(): the version whose memory it restored (no snippets)
    restored_version    bigint,
    -- prompt tokens the provider served from its prompt cache (included in prompt_tokens), and
    -- wrote to it (Anthropic's cache_creation_input_tokens)
    cached_prompt_tokens bigint NOT NULL DEFAULT 0,
    cache_write_tokens  bigint NOT NULL DEFAULT 0,
    -- a version made by memory.rebuild() or forget_snippet(): re-derived from the empty memory
    -- and the snippets in queue_ids
    rebuilt             bool NOT NULL DEFAULT false,
    PRIMARY KEY (chat_id, version)
);

-- What summarizing costs, per day and summarizer (e.g. 'openai:gpt-4o-mini'), failed attempts
-- included: written by the worker in the same transaction as the applied or failed batch, so
-- each attempt is counted exactly once. memory.llm_usage sums it.
CREATE TABLE memory.llm_usage_daily (
    day                 date NOT NULL,
    summarizer          text NOT NULL,
    batches_applied     bigint NOT NULL DEFAULT 0,
    attempts_failed     bigint NOT NULL DEFAULT 0,
    llm_requests        bigint NOT NULL DEFAULT 0,
    prompt_tokens       bigint NOT NULL DEFAULT 0,
    completion_tokens   bigint NOT NULL DEFAULT 0,
    rejected_ops        bigint NOT NULL DEFAULT 0,
    cached_prompt_tokens bigint NOT NULL DEFAULT 0,
    cache_write_tokens  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (day, summarizer)
);

-- What each owner's chats cost in LLM tokens per UTC day (attempts that failed included): what
-- memory_ext.owner_daily_tokens and memory.owner_budgets are checked against. Written with the
-- batch, like llm_usage_daily; only for summarizers that report usage (not the mock). A day's
-- figure is the sum of its owner's rows: a writer adds to a row it can lock without waiting, or
-- adds a row (the worker never waits for a client's open process_pending()).
CREATE TABLE memory.owner_usage_daily (
    day                 date NOT NULL,
    owner               text NOT NULL,
    llm_requests        bigint NOT NULL DEFAULT 0,
    prompt_tokens       bigint NOT NULL DEFAULT 0,
    completion_tokens   bigint NOT NULL DEFAULT 0
);
CREATE INDEX owner_usage_daily_day_owner_idx ON memory.owner_usage_daily (day, owner);

-- An owner's own daily token budget, instead of memory_ext.owner_daily_tokens (0: no limit).
-- Written through memory.set_owner_budget() (admins, audited).
CREATE TABLE memory.owner_budgets (
    owner         text PRIMARY KEY CHECK (btrim(owner) <> ''),
    daily_tokens  bigint NOT NULL CHECK (daily_tokens >= 0),
    set_at        timestamptz NOT NULL DEFAULT now()
);

-- Who did what: append-only for everyone but superusers (a trigger in security.sql), readable
-- by admins, trimmed by the worker after memory_ext.audit_retention. Writes are always logged;
-- reads (get, history) when memory_ext.audit_reads is on.
CREATE TABLE memory.audit_log (
    -- clock time, not transaction time: the actions of one transaction keep their order
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    identity    text NOT NULL,
    -- the database role the call ran as (PostgREST: the JWT's role)
    role        name NOT NULL,
    action      text NOT NULL,
    chat_id     text,
    queue_id    uuid,
    detail      text
);
-- Append-only and time-ordered: BRIN keeps the retention delete and time-range reads cheap at
-- almost no cost per insert.
CREATE INDEX audit_log_at_idx ON memory.audit_log USING brin (at);

-- Roles given memory.grant_admin(): their members may act on every chat.
CREATE TABLE memory.admin_roles (
    role        regrole PRIMARY KEY,
    granted_at  timestamptz NOT NULL DEFAULT now()
);

-- pg_dump keeps the data of extension tables only when they are registered.
SELECT pg_catalog.pg_extension_config_dump('memory.chat_metadata', '');
SELECT pg_catalog.pg_extension_config_dump('memory.chat_context_queue', '');
SELECT pg_catalog.pg_extension_config_dump('memory.chat_memory_history', '');
SELECT pg_catalog.pg_extension_config_dump('memory.chat_context_queue_seq', '');
SELECT pg_catalog.pg_extension_config_dump('memory.llm_usage_daily', '');
SELECT pg_catalog.pg_extension_config_dump('memory.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('memory.admin_roles', '');
SELECT pg_catalog.pg_extension_config_dump('memory.fact_keys', '');
SELECT pg_catalog.pg_extension_config_dump('memory.owner_usage_daily', '');
SELECT pg_catalog.pg_extension_config_dump('memory.owner_budgets', '');
SELECT pg_catalog.pg_extension_config_dump('memory.capture_inbox', '');
