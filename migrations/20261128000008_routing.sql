-- Provider routing: a notification whose providers all failed retryably
-- waits as a due row (`retrying`); `retries` counts those rounds against the
-- provider's max_retries. `attempts` keeps counting every provider call
-- (one delivery_attempts row each, fallbacks included).
ALTER TABLE notifications ADD COLUMN retries INTEGER NOT NULL DEFAULT 0;
