\set id random(0, 999)
SELECT queue_id FROM memory.enqueue('chat' || :id, 'confirmed: plan = PPO. The user compares plans for next year and asks about premiums.');
