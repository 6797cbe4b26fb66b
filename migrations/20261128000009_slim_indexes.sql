-- Fewer index entries per notification. Every claim inserts a row and every
-- finish rewrites it (the `sent_at` change rules out a HOT update), so each
-- index on `notifications` costs one entry per write, twice per notification.
--
-- The per-user listing used an expression index on the payload, which
-- re-extracted the user id from the jsonb on every write. The stored
-- `user_id` column (migration 2) holds the same value: index that instead,
-- and only for rows that have one.
DROP INDEX IF EXISTS notifications_recipient_user_idx;
CREATE INDEX notifications_user_created_idx ON notifications (user_id, created_at DESC)
    WHERE user_id IS NOT NULL;

-- `status` changes on every transition, so this index took a new entry on
-- every write. The listing orders by `created_at`, which
-- notifications_created_id_idx serves; a status filter is applied while
-- walking it. Waiting rows are found through notifications_due_idx.
DROP INDEX IF EXISTS notifications_status_created_idx;

-- A delivery attempt is inserted as `sending` and finished moments later;
-- none of the finished columns is indexed, so with free space on its page
-- the update is HOT and touches no index.
ALTER TABLE delivery_attempts SET (fillfactor = 70);
