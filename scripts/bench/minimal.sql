\set id random(0, 999)
INSERT INTO public.minimal_queue (chat_id, snippet) VALUES ('chat' || :id, 'confirmed: plan = PPO. The user compares plans for next year and asks about premiums.') RETURNING id;
