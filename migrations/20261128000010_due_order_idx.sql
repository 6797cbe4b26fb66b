-- The scheduler claims due rows urgent first, then by due time:
-- `ORDER BY (priority = 'urgent') DESC, next_attempt_at LIMIT n`. An index on
-- `next_attempt_at` alone could not give that order, so every claim read all
-- rows due so far and sorted them: 10,000 due rows cost 11 ms per claim of
-- 100, and a night's backlog of quiet-hours deferrals released in the
-- morning would be read once per claim. An index in the claim's own order
-- lets it stop after `n` rows, however long the backlog.
DROP INDEX IF EXISTS notifications_due_idx;
CREATE INDEX notifications_due_idx ON notifications ((priority = 'urgent') DESC, next_attempt_at)
    WHERE status IN ('scheduled', 'deferred', 'throttled', 'retrying');
