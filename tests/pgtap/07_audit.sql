-- memory.audit_log: every write and admin action is logged, reads when audit_reads is on;
-- readable by admins only; append-only for everyone but superusers; trimmed by retention.
\ir _helpers.psql
BEGIN;
SELECT plan(13);

SELECT 'au-' || gen_random_uuid() AS sub \gset
SELECT pg_temp.req('authenticated', :'sub', $$SELECT memory.create_chat('au-chat')$$) AS s1,
       pg_temp.req('authenticated', :'sub', $$SELECT queue_id FROM memory.enqueue('au-chat', 'hello')$$) AS qid,
       pg_temp.req('authenticated', :'sub', $$SELECT version FROM memory.get('au-chat')$$) AS s2 \gset
SET LOCAL memory_ext.audit_reads = on;
SELECT pg_temp.req('authenticated', :'sub', $$SELECT version FROM memory.get('au-chat')$$) AS s3,
       pg_temp.req('authenticated', :'sub', $$SELECT count(*) FROM memory.history('au-chat')$$) AS s3h,
       pg_temp.req('authenticated', :'sub', $$SELECT memory.retry_failed('au-chat')$$) AS s4,
       pg_temp.req('authenticated', :'sub', $$SELECT memory.forget('au-chat')$$) AS s5,
       pg_temp.req('authenticated', :'sub', $$SELECT version FROM memory.get('au-chat')$$) AS s6 \gset

SELECT is((SELECT array_agg(action ORDER BY at, action) FROM memory.audit_log WHERE identity = :'sub'),
          ARRAY['create_chat', 'enqueue', 'get', 'history', 'retry', 'forget'],
          'create_chat, enqueue, get and history (once audit_reads is on), retry and forget are logged in order');
SELECT is((SELECT queue_id::text FROM memory.audit_log WHERE identity = :'sub' AND action = 'enqueue'),
          :'qid', 'the enqueue row names its queue id');
SELECT is((SELECT DISTINCT role::text FROM memory.audit_log WHERE identity = :'sub'), 'authenticated',
          'and the role the request ran as');
SELECT pg_temp.req('service_role', NULL, $$SELECT memory.process_pending()$$) AS s7 \gset
SELECT ok(EXISTS (SELECT 1 FROM memory.audit_log WHERE identity = 'role:service_role' AND action = 'process_pending'),
          'admin actions are logged');

SELECT is(pg_temp.state('authenticated', :'sub', $$SELECT count(*) FROM memory.audit_log$$), '42501',
          'an API role cannot read the audit log');
SELECT ok(pg_temp.req('service_role', NULL, $$SELECT count(*) FROM memory.audit_log$$)::int >= 5,
          'an admin can');
SELECT is(pg_temp.state('service_role', NULL, $$DELETE FROM memory.audit_log RETURNING 1$$), '42501',
          'an admin cannot delete from it');
-- BYPASSRLS, like Supabase's service_role: row security cannot be what stops it.
CREATE ROLE pgtap_auditor NOLOGIN BYPASSRLS;
GRANT USAGE ON SCHEMA memory TO pgtap_auditor;
GRANT UPDATE, DELETE, TRUNCATE ON memory.audit_log TO pgtap_auditor;
SELECT is(pg_temp.req('pgtap_auditor', NULL, $$UPDATE memory.audit_log SET detail = 'x' RETURNING 1$$),
          '42501: memory.audit_log is append-only', 'even a role granted UPDATE and bypassing RLS cannot change it');
SELECT is(pg_temp.state('pgtap_auditor', NULL, $$TRUNCATE memory.audit_log$$), '42501',
          'nor TRUNCATE it');

-- An admin writing a chat table directly (bypassing the API's checks) is audited; the API's own
-- writes are not audited twice.
SELECT 'au-' || gen_random_uuid() AS sub2 \gset
SELECT pg_temp.req('authenticated', :'sub2', $$SELECT memory.create_chat('au-direct')$$) AS s8 \gset
SELECT is(pg_temp.req('service_role', NULL,
              $$UPDATE memory.chat_metadata SET owner = 'mallory' WHERE chat_id = 'au-direct' RETURNING owner$$),
          'mallory', 'an admin changes an owner directly');
SELECT ok(EXISTS (SELECT 1 FROM memory.audit_log
                   WHERE action = 'direct_update' AND role = 'service_role'
                     AND detail LIKE 'UPDATE on memory.chat_metadata: %SET owner = ''mallory''%'),
          'the direct write is audited, with its statement');
SELECT is((SELECT count(*)::int FROM memory.audit_log WHERE action LIKE 'direct_%' AND role <> 'service_role'),
          0, 'the API''s own writes are not "direct"');

-- retention (what the worker runs): old rows go, recent ones stay
INSERT INTO memory.audit_log (at, identity, role, action) VALUES (now() - interval '40 days', :'sub', 'x', 'old');
SELECT memory._cleanup(3600, 1000, 30 * 86400) AS cleaned \gset
SELECT is((SELECT array_agg(action ORDER BY at, action) FROM memory.audit_log WHERE identity = :'sub'),
          ARRAY['create_chat', 'enqueue', 'get', 'history', 'retry', 'forget'], 'retention removed only the old row');

SELECT * FROM finish();
ROLLBACK;
