-- webhook_deliveries_dead: the dead deliveries, newest first, without scanning those still retried
CREATE INDEX webhook_deliveries_dead ON webhook_deliveries (id) WHERE dead_at IS NOT NULL;
