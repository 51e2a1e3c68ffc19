-- Identity and ownership through PostgREST-style requests: user A's chat is invisible to user B
-- in every function -- it reads exactly as a chat that does not exist (404, no existence
-- oracle) -- anon can do nothing, admins can do everything.
\ir _helpers.psql
BEGIN;
SELECT plan(31);

SELECT is(pg_temp.req('authenticated', 'alice', $$SELECT memory.current_identity()$$), 'alice',
          'identity is the JWT sub');
SELECT is(pg_temp.req('service_role', NULL, $$SELECT memory.current_identity()$$), 'role:service_role',
          'without a sub, the invoking role (not the definer), in its own namespace');
SELECT is(pg_temp.req('authenticated', 'alice', $$SELECT memory.create_chat('a-chat')$$), 'a-chat',
          'alice creates a chat');
SELECT is(pg_temp.state('authenticated', 'alice',
                        $$SELECT queue_id FROM memory.enqueue('a-chat', 'confirmed: zip = 94110')$$),
          'ok', 'alice enqueues into it');
SELECT is((SELECT owner FROM memory.chat_metadata WHERE chat_id = 'a-chat'), 'alice',
          'the chat belongs to the identity that created it');
SELECT id AS qid FROM memory.chat_context_queue WHERE chat_id = 'a-chat' \gset

-- bob, another user of the same role
SELECT is(pg_temp.req('authenticated', 'bob', $$SELECT user_confirmed FROM memory.get('a-chat')$$),
          'P0002: chat "a-chat" not found', 'bob cannot read it: it reads as missing');
SELECT is(pg_temp.req('authenticated', 'bob', $$SELECT user_confirmed FROM memory.get('zz-chat')$$),
          'P0002: chat "zz-chat" not found', 'the same error as a chat that does not exist');
SELECT is(pg_temp.state('authenticated', 'bob', $$SELECT queue_id FROM memory.enqueue('a-chat', 'x')$$),
          '42501', 'bob cannot enqueue into it');
SELECT is(pg_temp.state('authenticated', 'bob', format($$SELECT memory.wait(%L, '0 s')$$, :'qid')),
          'P0002', 'bob cannot wait on its snippet');
SELECT is(replace(pg_temp.req('authenticated', 'bob', format($$SELECT status FROM memory.status(%L)$$, :'qid')),
                  :'qid', 'ID'),
          replace(pg_temp.req('authenticated', 'bob', format($$SELECT status FROM memory.status(%L)$$,
                                                              '00000000-0000-0000-0000-000000000000')),
                  '00000000-0000-0000-0000-000000000000', 'ID'),
          'bob cannot see its snippet''s status: the same error as an unknown id');
SELECT is(pg_temp.state('authenticated', 'bob', $$SELECT count(*) FROM memory.history('a-chat')$$),
          'P0002', 'bob cannot read its history');
SELECT is(pg_temp.state('authenticated', 'bob', $$SELECT memory.forget('a-chat')$$),
          'P0002', 'bob cannot forget it');
SELECT is(pg_temp.state('authenticated', 'bob', $$SELECT memory.retry_failed('a-chat')$$),
          'P0002', 'bob cannot retry it');
SELECT is(pg_temp.state('authenticated', 'bob', $$SELECT memory.create_chat('a-chat')$$),
          '42501', 'bob cannot take it over (create_chat and enqueue tell: chat ids should be unguessable)');
UPDATE memory.chat_context_queue SET status = 'failed' WHERE chat_id = 'a-chat';
SELECT is(pg_temp.req('authenticated', 'bob', $$SELECT memory.retry_failed()$$), '0',
          'bob''s retry of all his chats does not touch alice''s');
SELECT is((SELECT status FROM memory.chat_context_queue WHERE chat_id = 'a-chat'), 'failed',
          'still failed');
SELECT is((SELECT count(*)::int FROM memory.chat_context_queue WHERE chat_id = 'a-chat'), 1,
          'nothing was enqueued by bob');

-- anon: nothing at all
SELECT is(pg_temp.state('anon', NULL, $$SELECT user_confirmed FROM memory.get('a-chat')$$), '42501',
          'anon cannot read (no EXECUTE at all)');
SELECT is(pg_temp.state('anon', NULL, $$SELECT queue_id FROM memory.enqueue('anon-chat', 'x')$$),
          '42501', 'anon cannot enqueue');
SELECT is(pg_temp.state('anon', 'alice', $$SELECT memory.create_chat('x')$$), '42501',
          'anon cannot act even with a sub claim');

-- errors PostgREST maps to 404 / 400
SELECT is(pg_temp.state('authenticated', 'alice', $$SELECT version FROM memory.get('no-such-chat')$$),
          'P0002', 'an unknown chat is P0002');
SELECT is(pg_temp.state('authenticated', 'alice', $$SELECT queue_id FROM memory.enqueue('a-chat', '  ')$$),
          '22023', 'invalid input is 22023');

-- admins
SELECT is(pg_temp.req('service_role', NULL, $$SELECT user_confirmed::text FROM memory.get('a-chat')$$),
          '{}', 'the service role reads any chat');
SELECT is(pg_temp.req('service_role', NULL, $$SELECT memory.retry_failed('a-chat')$$), '1',
          'and retries it');
SELECT is(pg_temp.state('authenticated', 'alice', $$SELECT memory.process_pending()$$), '42501',
          'process_pending is for admins only');
SELECT pg_temp.req('service_role', NULL, $$SELECT queue_id FROM memory.enqueue('a-chat', 'from the backend')$$) AS backend_qid \gset
SELECT is(pg_temp.req('authenticated', 'alice', format($$SELECT status FROM memory.status(%L)$$, :'backend_qid')),
          'pending_summarization', 'an admin enqueues on the owner''s behalf, and the owner sees it');
SELECT is(pg_temp.req('service_role', NULL, $$SELECT memory.create_chat('a-chat')$$), 'a-chat',
          'create_chat is idempotent for an admin on someone else''s chat');
SELECT is((SELECT owner FROM memory.chat_metadata WHERE chat_id = 'a-chat'), 'alice',
          'the chat still belongs to alice');

-- JWT identities and role identities never collide: a user whose sub is 'service_role' is not
-- the service role, and does not own what the backend created under it.
SELECT is(pg_temp.req('service_role', NULL, $$SELECT memory.create_chat('backend-chat')$$), 'backend-chat',
          'the backend (service role, no sub) creates a chat');
SELECT is(pg_temp.state('authenticated', 'service_role', $$SELECT version FROM memory.get('backend-chat')$$),
          'P0002', 'a user whose sub is "service_role" cannot read it');
SELECT is(pg_temp.state('authenticated', NULL, $$SELECT queue_id FROM memory.enqueue('no-sub-chat', 'x')$$),
          '42501', 'a JWT without a sub cannot own chats');

SELECT * FROM finish();
ROLLBACK;
