\set id random(0, 999)
SELECT * FROM memory.context('chat' || :id);
