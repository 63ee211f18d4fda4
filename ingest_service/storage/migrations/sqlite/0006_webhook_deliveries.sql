-- webhook_deliveries: one row per terminal change and matching webhook endpoint, until delivered
CREATE TABLE webhook_deliveries (
	id INTEGER NOT NULL, 
	endpoint VARCHAR NOT NULL, 
	message_id VARCHAR NOT NULL, 
	media_id VARCHAR(36) NOT NULL, 
	owner_id VARCHAR NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	revision BIGINT NOT NULL, 
	event_time FLOAT NOT NULL, 
	created_at FLOAT NOT NULL, 
	attempts INTEGER NOT NULL, 
	next_attempt_at FLOAT NOT NULL, 
	claim VARCHAR, 
	last_error VARCHAR, 
	dead_at FLOAT, 
	PRIMARY KEY (id), 
	UNIQUE (endpoint, message_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (endpoint, dead_at, next_attempt_at);
