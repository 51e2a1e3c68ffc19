-- The bench_api database of scripts/bench.sh and scripts/bench_instructions.sh: memory_ext,
-- the baselines' tables, 1000 chats of the superuser, and an app's message table plain and watched.
CREATE EXTENSION memory_ext;
CREATE TABLE public.plain_chats (LIKE memory.chat_metadata INCLUDING ALL);
CREATE TABLE public.plain_queue (LIKE memory.chat_context_queue INCLUDING ALL,
    FOREIGN KEY (chat_id) REFERENCES public.plain_chats (chat_id));
-- the issue's baseline: the least a durable enqueue could write
CREATE TABLE public.minimal_queue (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    chat_id text NOT NULL, snippet text NOT NULL);
CREATE INDEX ON public.minimal_queue (chat_id);
INSERT INTO public.plain_chats (chat_id, owner) SELECT 'chat' || g, 'postgres' FROM generate_series(0, 999) g;
SELECT count(*) FROM (SELECT memory.create_chat('chat' || g) FROM generate_series(0, 999) g) x;
-- an app's message table, and the same table watched (memory.watch)
CREATE TABLE public.messages_plain (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    conversation_id text NOT NULL, user_id text NOT NULL, role text NOT NULL, content text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX ON public.messages_plain (conversation_id);
CREATE TABLE public.messages_watched (LIKE public.messages_plain INCLUDING ALL);
SELECT memory.watch('public.messages_watched', 'conversation_id', 'content', 'user_id', 'role');
