-- jobs, attempts, results, events, counters
CREATE TABLE jobs (
	media_id VARCHAR NOT NULL, 
	owner_id VARCHAR NOT NULL, 
	category VARCHAR NOT NULL, 
	context JSON NOT NULL, 
	sha256 VARCHAR(64) NOT NULL, 
	size_bytes BIGINT NOT NULL, 
	content_type VARCHAR NOT NULL, 
	content_ref VARCHAR NOT NULL, 
	priority INTEGER NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	attempt INTEGER NOT NULL, 
	max_attempts INTEGER NOT NULL, 
	quota_deferrals INTEGER NOT NULL, 
	next_attempt_at FLOAT NOT NULL, 
	submitted_at FLOAT NOT NULL, 
	updated_at FLOAT NOT NULL, 
	lease_owner VARCHAR, 
	lease_expires_at FLOAT, 
	lease_token INTEGER NOT NULL, 
	result_key VARCHAR(64), 
	reused BOOLEAN NOT NULL, 
	error_reason VARCHAR, 
	error_message VARCHAR, 
	error_transient BOOLEAN, 
	revision BIGINT NOT NULL, 
	PRIMARY KEY (media_id)
);
CREATE INDEX jobs_lease_expiry ON jobs (status, lease_expires_at);
CREATE INDEX jobs_owner ON jobs (owner_id, status);
CREATE INDEX jobs_claim_order ON jobs (status, priority DESC, submitted_at, media_id);
CREATE TABLE results (
	"key" VARCHAR(64) NOT NULL, 
	sha256 VARCHAR(64) NOT NULL, 
	analyzer_name VARCHAR NOT NULL, 
	analyzer_version VARCHAR NOT NULL, 
	tags JSON NOT NULL, 
	embedding BLOB NOT NULL, 
	embedding_dimensions INTEGER NOT NULL, 
	created_at FLOAT NOT NULL, 
	PRIMARY KEY ("key")
);
CREATE TABLE events (
	revision BIGINT NOT NULL, 
	media_id VARCHAR NOT NULL, 
	owner_id VARCHAR NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	previous_status VARCHAR(16), 
	attempt INTEGER NOT NULL, 
	event_time FLOAT NOT NULL, 
	result_key VARCHAR(64), 
	reused BOOLEAN NOT NULL, 
	error_reason VARCHAR, 
	error_message VARCHAR, 
	error_transient BOOLEAN, 
	next_attempt_at FLOAT, 
	PRIMARY KEY (revision)
);
CREATE INDEX events_time ON events (event_time);
CREATE INDEX events_media ON events (media_id, revision);
CREATE TABLE counters (
	name VARCHAR NOT NULL, 
	value BIGINT NOT NULL, 
	PRIMARY KEY (name)
);
CREATE TABLE job_attempts (
	id INTEGER NOT NULL, 
	media_id VARCHAR NOT NULL, 
	number INTEGER NOT NULL, 
	started_at FLOAT NOT NULL, 
	ended_at FLOAT, 
	outcome VARCHAR(32) NOT NULL, 
	error_reason VARCHAR, 
	error_message VARCHAR, 
	error_transient BOOLEAN, 
	PRIMARY KEY (id), 
	FOREIGN KEY(media_id) REFERENCES jobs (media_id)
);
CREATE INDEX job_attempts_media ON job_attempts (media_id, id);
INSERT INTO counters (name, value) VALUES ('revision', 0), ('compacted_through', 0), ('paused', 0);
