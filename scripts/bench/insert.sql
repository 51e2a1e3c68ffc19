\set id random(0, 999)
INSERT INTO public.plain_queue (chat_id, new_context_snippet, enqueued_by) VALUES ('chat' || :id, 'confirmed: plan = PPO. The user compares plans for next year and asks about premiums.', current_user) RETURNING id;
