\set id random(0, 999)
SELECT * FROM memory.get('chat' || :id);
