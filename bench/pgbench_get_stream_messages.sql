-- Message DB reading a whole 100,000-message stream server-side in one call
-- (batch_size -1: no paging), the alternative to bench/fold.lua. Run with
-- search_path = message_store.
SELECT * FROM get_stream_messages('fold-1', 0, -1);
