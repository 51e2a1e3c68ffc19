\set id random(0, 999)
INSERT INTO public.messages_watched (conversation_id, user_id, role, content) VALUES ('conv' || :id, 'user' || :id, 'user', 'confirmed: plan = PPO. The user compares plans for next year and asks about premiums.');
