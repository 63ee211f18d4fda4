-- webhook_deliveries_claimed: each endpoint's claimed deliveries, counted by every claim without scanning those waiting
CREATE INDEX webhook_deliveries_claimed ON webhook_deliveries (endpoint, next_attempt_at) WHERE claim IS NOT NULL;
