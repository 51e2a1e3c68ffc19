-- Row level security: a role given direct SELECT on the tables sees only its own rows.
\ir _helpers.psql
BEGIN;
SELECT plan(9);

SELECT pg_temp.req('authenticated', 'alice', $$SELECT queue_id FROM memory.enqueue('a1', 'hello')$$) AS q1,
       pg_temp.req('authenticated', 'alice', $$SELECT queue_id FROM memory.enqueue('a2', 'hello')$$) AS q2,
       pg_temp.req('authenticated', 'bob', $$SELECT queue_id FROM memory.enqueue('b1', 'hello')$$) AS q3 \gset
SELECT memory.process_pending() AS applied \gset
GRANT SELECT ON memory.chat_metadata, memory.chat_context_queue, memory.chat_memory_history,
    memory.audit_log TO authenticated;

SELECT is(pg_temp.req('authenticated', 'alice', $$SELECT string_agg(chat_id, ',' ORDER BY chat_id) FROM memory.chat_metadata$$),
          'a1,a2', 'alice sees her chats only');
SELECT is(pg_temp.req('authenticated', 'bob', $$SELECT string_agg(chat_id, ',' ORDER BY chat_id) FROM memory.chat_metadata$$),
          'b1', 'bob sees his');
SELECT is(pg_temp.req('authenticated', 'alice', $$SELECT count(*) FROM memory.chat_context_queue$$),
          '2', 'alice sees her queue rows only');
SELECT is(pg_temp.req('authenticated', 'alice', $$SELECT string_agg(chat_id, ',' ORDER BY chat_id) FROM memory.chat_memory_history$$),
          'a1,a2', 'and her history');
SELECT is(pg_temp.req('authenticated', 'mallory', $$SELECT count(*) FROM memory.chat_metadata$$),
          '0', 'an identity with no chats sees nothing');
SELECT is(pg_temp.req('authenticated', 'alice', $$SELECT count(*) FROM memory.audit_log$$),
          '0', 'the audit log is for admins');
SELECT is(pg_temp.state('authenticated', 'alice', $$UPDATE memory.chat_metadata SET owner = 'alice' RETURNING 1$$),
          '42501', 'no direct writes');
SELECT is(pg_temp.req('service_role', NULL, $$SELECT count(*) FROM memory.chat_metadata$$),
          '3', 'the admin sees every chat');
SELECT is(pg_temp.req('service_role', NULL, $$SELECT count(*) FROM memory.chat_context_queue$$),
          '3', 'and every queue row');

SELECT * FROM finish();
ROLLBACK;
