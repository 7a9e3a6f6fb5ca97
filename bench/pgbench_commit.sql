-- A floor: a transaction that writes one small WAL record (a transactional
-- logical message, which takes a transaction id) and commits, so its
-- commit waits for the WAL flush like any append's: what is left is the
-- round trip, the commit and the fsync. (A transaction id alone is not
-- enough: a transaction that wrote no WAL before its commit record does
-- not wait for the flush.)
SELECT pg_logical_emit_message(true, 'es_bench', '');
