\set id random(0, 999)
SELECT * FROM memory.chat_metadata WHERE chat_id = 'chat' || :id;
