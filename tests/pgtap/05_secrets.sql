-- The LLM key and the outbound settings are superuser-only, and the key is shown to no one.
\ir _helpers.psql
BEGIN;
SELECT plan(9);

SET LOCAL memory_ext.llm_api_key = 'sk-pgtap-secret-0042';
SELECT is((SELECT count(*)::int FROM pg_settings WHERE setting LIKE '%sk-pgtap-secret%'), 0,
          'SHOW ALL / pg_settings never list the key, even for a superuser');
SELECT is(current_setting('memory_ext.llm_api_key'), 'sk-pgtap-secret-0042',
          'a superuser can read it explicitly');
SELECT is(pg_temp.state('authenticated', 'alice', $$SELECT current_setting('memory_ext.llm_api_key')$$),
          '42501', 'an API role cannot read it');
SELECT is(pg_temp.req('authenticated', 'alice',
          $$SELECT count(*) FROM pg_settings WHERE name LIKE 'memory_ext.llm_%' AND name IN ('memory_ext.llm_api_key', 'memory_ext.llm_endpoint')$$),
          '0', 'nor see the key or the endpoint in pg_settings');
SELECT is(pg_temp.req('service_role', NULL, $$SELECT count(*) FROM pg_settings WHERE setting LIKE '%sk-pgtap-secret%'$$),
          '0', 'nor can the admin role');
SELECT is(pg_temp.state('authenticated', 'alice', $$SET LOCAL memory_ext.llm_api_key = 'mine'$$),
          '42501', 'an API role cannot set the key');
SELECT is(pg_temp.state('authenticated', 'alice', $$SET LOCAL memory_ext.llm_endpoint = 'http://169.254.169.254/'$$),
          '42501', 'nor point the worker at an internal address');
SELECT is(pg_temp.state('service_role', NULL, $$SET LOCAL memory_ext.summarizer = 'openai'$$),
          '42501', 'nor pick the summarizer, admin role included');
SELECT is(pg_temp.state('authenticated', 'alice', $$SET LOCAL memory_ext.rate_limit_per_minute = 0$$),
          '42501', 'nor lift its rate limit');

SELECT * FROM finish();
ROLLBACK;
