-- search_path hijacking: a caller's own functions and operators, first on its search_path,
-- must not change what the API does (every function pins search_path = pg_catalog, pg_temp).
\ir _helpers.psql
BEGIN;
SELECT plan(6);

SELECT pg_temp.req('authenticated', 'alice', $$SELECT queue_id FROM memory.enqueue('a-chat', 'hello')$$) AS q \gset

-- The attacker's schema: an identity spoofer, a "not equal" that is never true, and a now()
-- from the future.
CREATE SCHEMA evil;
GRANT USAGE ON SCHEMA evil TO authenticated;
CREATE FUNCTION evil.current_setting(text, boolean) RETURNS text LANGUAGE sql
    AS $$ SELECT '{"sub": "alice"}' $$;
CREATE FUNCTION evil.current_setting(text) RETURNS text LANGUAGE sql
    AS $$ SELECT '{"sub": "alice"}' $$;
CREATE FUNCTION evil.text_ne(text, text) RETURNS boolean LANGUAGE sql AS $$ SELECT false $$;
CREATE OPERATOR evil.<> (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.text_ne);
CREATE FUNCTION evil.now() RETURNS timestamptz LANGUAGE sql AS $$ SELECT 'infinity'::timestamptz $$;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA evil TO authenticated;

SELECT is(pg_temp.req('authenticated', 'mallory',
          $$SELECT current_setting('request.jwt.claims')$$, 'evil, pg_catalog'),
          '{"sub": "alice"}', 'the hijack works on the caller''s own queries');
SELECT is(pg_temp.req('authenticated', 'mallory',
          $$SELECT memory.current_identity()$$, 'evil, pg_catalog'),
          'mallory', 'but not on current_identity()');
SELECT is(pg_temp.state('authenticated', 'mallory',
          $$SELECT user_confirmed FROM memory.get('a-chat')$$, 'evil, pg_catalog'),
          'P0002', 'nor on the ownership check of get() (another''s chat reads as missing)');
SELECT is(pg_temp.state('authenticated', 'mallory',
          $$SELECT queue_id FROM memory.enqueue('a-chat', 'x')$$, 'evil, pg_catalog'),
          '42501', 'nor of enqueue()');
SELECT is(pg_temp.state('authenticated', 'mallory',
          $$SELECT memory.forget('a-chat')$$, 'evil, pg_catalog'),
          'P0002', 'nor of forget()');
-- pg_temp objects: a temporary table named like the extension's is never used
CREATE TEMP TABLE chat_metadata (chat_id text, owner text);
SELECT is(pg_temp.req('authenticated', 'alice',
          $$SELECT pending FROM memory.get('a-chat')$$, 'pg_temp, evil, pg_catalog'),
          '1', 'a temporary table of the same name changes nothing');

SELECT * FROM finish();
ROLLBACK;
