-- A floor: a transaction that writes nothing but its commit record (taking
-- a transaction id makes the commit write WAL and wait for its flush, like
-- any append), so what is left is the round trip, the commit and the fsync.
SELECT pg_current_xact_id();
