-- A notification in `sending` belongs to whoever claimed it until
-- `send_lease_until`. A redelivery (after a crash, or a duplicate request
-- being processed concurrently elsewhere) may take the send over only once
-- the lease has expired, so a live sender is never doubled.
ALTER TABLE notifications ADD COLUMN send_lease_until TIMESTAMPTZ;
