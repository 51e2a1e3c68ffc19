-- memory_ext.rate_limit_per_minute: over the limit, a writing call (enqueue, create_chat,
-- retry_failed, forget) fails with PostgREST's 429 convention (SQLSTATE PGRST, JSON message,
-- status + Retry-After in the detail) and writes nothing. Identities are fresh per run: the
-- buckets live in shared memory.
\ir _helpers.psql
BEGIN;
SELECT plan(17);

SELECT 'rl-' || gen_random_uuid() AS sub, 'rl-' || gen_random_uuid() AS other \gset
SET LOCAL memory_ext.rate_limit_per_minute = 3;

SELECT is(pg_temp.state('authenticated', :'sub', $$SELECT queue_id FROM memory.enqueue('rl-chat-' || memory.current_identity(), 'one')$$), 'ok', '1st of 3');
SELECT is(pg_temp.state('authenticated', :'sub', $$SELECT queue_id FROM memory.enqueue('rl-chat-' || memory.current_identity(), 'two')$$), 'ok', '2nd of 3');
SELECT is(pg_temp.state('authenticated', :'sub', $$SELECT queue_id FROM memory.enqueue('rl-chat-' || memory.current_identity(), 'three')$$), 'ok', '3rd of 3');
SELECT pg_temp.req('authenticated', :'sub', $$SELECT queue_id FROM memory.enqueue('rl-chat-' || memory.current_identity(), 'four')$$) AS over \gset
SELECT is(left(:'over', 7), 'PGRST: ', 'the 4th fails with SQLSTATE PGRST');
SELECT is((split_part(substr(:'over', 8), ' | ', 1)::jsonb) - 'details' - 'hint',
          '{"code": "MX429", "message": "rate limit exceeded"}'::jsonb,
          'its message is PostgREST''s JSON error');
SELECT is((split_part(:'over', ' | ', 2)::jsonb)->>'status', '429', 'its detail asks for HTTP 429');
SELECT ok(((split_part(:'over', ' | ', 2)::jsonb)->'headers'->>'Retry-After')::int BETWEEN 1 AND 20,
          'with a Retry-After of at most 20 s (one token per 20 s)');
SELECT is((SELECT count(*)::int FROM memory.chat_context_queue WHERE chat_id = 'rl-chat-' || :'sub'), 3,
          'nothing was enqueued by the refused call');
SELECT is(pg_temp.state('authenticated', :'other', $$SELECT queue_id FROM memory.enqueue('rl-chat-' || memory.current_identity(), 'one')$$),
          'ok', 'other identities have their own budget');

SELECT is((SELECT count(*)::int FROM (SELECT pg_temp.state('service_role', NULL,
              $$SELECT queue_id FROM memory.enqueue('rl-admin', 'bulk')$$) s
              FROM generate_series(1, 5)) x WHERE s = 'ok'), 5,
          'admins (bulk loads, the service role) are not limited');

-- Every writing call draws on the same budget.
SELECT 'rl-' || gen_random_uuid() AS third \gset
SELECT is(pg_temp.state('authenticated', :'third', format($$SELECT memory.create_chat('rl-%s-' || memory.current_identity())$$, n)), 'ok',
          format('create_chat %s of 3', n))
  FROM generate_series(1, 3) n;
SELECT is(pg_temp.state('authenticated', :'third', $$SELECT memory.create_chat('rl-4-' || memory.current_identity())$$),
          'PGRST', 'create_chat is limited too');
SELECT is(pg_temp.state('authenticated', :'third', $$SELECT memory.retry_failed()$$), 'PGRST',
          'so is retry_failed');
SELECT is(pg_temp.state('authenticated', :'third', $$SELECT memory.forget('rl-1-' || memory.current_identity())$$),
          'PGRST', 'and forget');
SELECT is((SELECT count(*)::int FROM memory.chat_metadata WHERE owner = :'third'), 3,
          'the refused calls wrote nothing: no chat created or forgotten');

SELECT * FROM finish();
ROLLBACK;
