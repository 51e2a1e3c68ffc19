-- Least privilege: nothing for PUBLIC, explicit grants, definer rights with a fixed search_path.
\ir _helpers.psql
BEGIN;
SELECT plan(28);

SELECT is((SELECT count(*)::int FROM pg_proc p
            WHERE p.pronamespace = 'memory'::regnamespace
              AND has_function_privilege('public', p.oid, 'EXECUTE')),
          0, 'PUBLIC may execute no memory function');
SELECT is((SELECT count(*)::int FROM pg_class c
            WHERE c.relnamespace = 'memory'::regnamespace AND c.relkind IN ('r', 'v', 'S')
              AND (has_table_privilege('public', c.oid, 'SELECT')
                   OR has_table_privilege('public', c.oid, 'INSERT'))),
          0, 'PUBLIC has no privilege on any memory table, view or sequence');
SELECT ok(NOT has_schema_privilege('public', 'memory', 'USAGE'), 'PUBLIC has no schema usage');

-- Supabase roles existed at CREATE EXTENSION: authenticated got usage, service_role admin.
SELECT ok(NOT has_schema_privilege('anon', 'memory', 'USAGE'), 'anon: no schema usage');
SELECT ok(NOT has_function_privilege('anon', 'memory.enqueue(text, text, text)', 'EXECUTE'),
          'anon cannot enqueue');
SELECT ok(has_function_privilege('authenticated', 'memory.enqueue(text, text, text)', 'EXECUTE')
          AND has_function_privilege('authenticated', 'memory.get(text)', 'EXECUTE')
          AND has_function_privilege('authenticated', 'memory.wait(uuid, interval)', 'EXECUTE'),
          'authenticated can call the API');
SELECT ok(NOT has_function_privilege('authenticated', 'memory.process_pending(integer)', 'EXECUTE')
          AND NOT has_function_privilege('authenticated', 'memory.worker_status()', 'EXECUTE')
          AND NOT has_function_privilege('authenticated', 'memory.grant_admin(regrole)', 'EXECUTE'),
          'authenticated cannot call admin functions');
SELECT ok(NOT has_table_privilege('authenticated', 'memory.chat_metadata', 'SELECT'),
          'authenticated has no table privilege');
SELECT ok(has_function_privilege('service_role', 'memory.process_pending(integer)', 'EXECUTE')
          AND has_table_privilege('service_role', 'memory.audit_log', 'SELECT'),
          'service_role is admin');
SELECT is(pg_temp.req('service_role', NULL, 'SELECT memory._is_admin()'), 'true',
          'service_role members are admins');
SELECT is(pg_temp.req('authenticated', 'alice', 'SELECT memory._is_admin()'), 'false',
          'authenticated users are not');

-- Every function touching the tables runs with definer rights; every function has a fixed
-- search_path.
-- Exempt: SQL-standard bodies (bound to their objects at CREATE time) and C functions that run
-- no SQL at all, or only a schema-qualified call (_chat_id_problem, _is_admin).
SELECT is((SELECT array_agg(p.proname::text ORDER BY p.proname) FROM pg_proc p
            WHERE p.pronamespace = 'memory'::regnamespace
              AND p.prosqlbody IS NULL
              AND NOT coalesce(p.proconfig @> ARRAY['search_path=pg_catalog, pg_temp'], false)),
          ARRAY['_admin_role', '_audit_reads', '_chat_id_problem', '_count_memory',
                '_debounce_max_ms', '_debounce_ms', '_is_admin', '_max_snippet_bytes', '_note_denied',
                '_owner_daily_tokens', '_rate_limit', '_render_context', '_superuser',
                '_token_limit', '_trigger_args', '_wake_at_commit',
                'count_tokens', 'current_identity'],
          'every memory function pins search_path = pg_catalog, pg_temp, but the C ones running no SQL');
SELECT is((SELECT array_agg(p.proname::text ORDER BY p.proname) FROM pg_proc p
            WHERE p.pronamespace = 'memory'::regnamespace AND p.prosqlbody IS NOT NULL),
          ARRAY['_budget_deferred_message', '_chat_id_rules', '_invoker', '_jwt_sub',
                '_public_error', '_usage_sum', '_utc_today', '_utc_tomorrow'],
          'the identity and chat-id rules (and constants) have SQL-standard bodies instead');
-- Exactly the documented API (README) is executable by an API role: no internal function is
-- reachable as /rpc/... but the helpers that answer only about the caller.
SELECT is((SELECT array_agg(p.oid::regprocedure::text ORDER BY p.oid::regprocedure::text)
             FROM pg_proc p
            WHERE p.pronamespace = 'memory'::regnamespace
              AND has_function_privilege('authenticated', p.oid, 'EXECUTE')),
          ARRAY['memory._admin_role()', 'memory._audit_reads()', 'memory._invoker()',
                'memory._is_admin()', 'memory._is_admin_catalog()', 'memory._jwt_sub()',
                'memory._owns_chat(text)',
                'memory._queue_row_xmin(uuid)',
                'memory._token_limit()', 'memory.context(text,integer)', 'memory.count_tokens(text)',
                'memory.create_chat(text)', 'memory.current_identity()',
                'memory.enqueue(text,text,text)', 'memory.forget(text)',
                'memory.forget_snippet(uuid)', 'memory.get(text)',
                'memory.history(text)', 'memory.rebuild(text)', 'memory.retry_failed(text)',
                'memory.rollback(text,bigint)',
                'memory.status(uuid)',
                'memory.wait(uuid,interval)'],
          'an API role can execute the documented API and caller-only helpers, nothing else');
SELECT is((SELECT array_agg(f ORDER BY f) FROM unnest(ARRAY[
              'memory.create_chat(text)', 'memory.enqueue(text,text,text)', 'memory.get(text)',
              'memory.status(uuid)', 'memory.history(text)', 'memory.forget(text)',
              'memory.retry_failed(text)', 'memory.process_pending(integer)',
              'memory.grant_usage(regrole)', 'memory.grant_admin(regrole)']) f
            WHERE NOT (SELECT prosecdef FROM pg_proc WHERE oid = f::regprocedure)),
          NULL::text[], 'API functions that touch tables are SECURITY DEFINER');

-- grant_usage / revoke_usage / grant_admin.
CREATE ROLE pgtap_app NOLOGIN;
SELECT lives_ok($$SELECT memory.grant_usage('pgtap_app')$$, 'an admin grants usage');
SELECT ok(has_function_privilege('pgtap_app', 'memory.enqueue(text, text, text)', 'EXECUTE')
          AND NOT has_function_privilege('pgtap_app', 'memory.process_pending(integer)', 'EXECUTE'),
          'usage means the API functions only');
SELECT is(pg_temp.state('pgtap_app', NULL, $$SELECT memory.grant_admin('pgtap_app')$$), '42501',
          'a usage role cannot make itself admin');
SELECT is(pg_temp.req('authenticated', 'alice', $$SELECT memory.grant_usage('anon')$$),
          '42501: permission denied for function grant_usage', 'nor can authenticated grant');
SELECT throws_ok($$SELECT memory.grant_usage(NULL)$$, '22023', 'role must not be null',
                 'a NULL role is invalid input');
SELECT lives_ok($$SELECT memory.revoke_usage('pgtap_app')$$, 'usage can be revoked');
SELECT ok(NOT has_function_privilege('pgtap_app', 'memory.enqueue(text, text, text)', 'EXECUTE'),
          'revoked');

-- grant_admin / revoke_admin, and memory_ext.admin_role.
SELECT lives_ok($$SELECT memory.grant_admin('pgtap_app')$$, 'an admin grants admin');
SELECT is(pg_temp.req('pgtap_app', NULL, 'SELECT memory._is_admin()'), 'true',
          'members of a role given grant_admin are admins');
SELECT ok(has_function_privilege('pgtap_app', 'memory.process_pending(integer)', 'EXECUTE')
          AND has_table_privilege('pgtap_app', 'memory.audit_log', 'SELECT'),
          'with the admin functions and tables');
SELECT lives_ok($$SELECT memory.revoke_admin('pgtap_app')$$, 'admin can be revoked');
SELECT is(pg_temp.req('pgtap_app', NULL, 'SELECT memory._is_admin()'), 'false',
          'revoked: usage stays, admin is gone');
CREATE ROLE pgtap_boss NOLOGIN;
CREATE ROLE pgtap_ops NOLOGIN IN ROLE pgtap_boss;
SELECT memory.grant_usage('pgtap_ops') AS granted \gset
SET LOCAL memory_ext.admin_role = 'pgtap_boss';
SELECT is(pg_temp.req('pgtap_ops', NULL, 'SELECT memory._is_admin()'), 'true',
          'members of memory_ext.admin_role are admins');

SELECT * FROM finish();
ROLLBACK;
