-- media, outbox, counters
CREATE TABLE media (
	id VARCHAR(36) NOT NULL, 
	owner_id VARCHAR NOT NULL, 
	category VARCHAR NOT NULL, 
	context JSON NOT NULL, 
	filename VARCHAR NOT NULL, 
	content_type VARCHAR NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	size_bytes BIGINT NOT NULL, 
	sha256 VARCHAR(64) NOT NULL, 
	width INTEGER NOT NULL, 
	height INTEGER NOT NULL, 
	priority INTEGER NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	not_applicable_reason VARCHAR NOT NULL, 
	attempt INTEGER NOT NULL, 
	tags JSON, 
	embedding BLOB, 
	embedding_dimensions INTEGER NOT NULL, 
	analyzer_name VARCHAR NOT NULL, 
	analyzer_version VARCHAR NOT NULL, 
	reused BOOLEAN NOT NULL, 
	error_reason VARCHAR, 
	error_message VARCHAR, 
	error_attempt INTEGER, 
	status_revision BIGINT NOT NULL, 
	created_at FLOAT NOT NULL, 
	updated_at FLOAT NOT NULL, 
	PRIMARY KEY (id)
);
CREATE INDEX media_owner_status_time ON media (owner_id, status, created_at, id);
CREATE INDEX media_owner_time ON media (owner_id, created_at, id);
CREATE TABLE counters (
	name VARCHAR NOT NULL, 
	value BIGINT NOT NULL, 
	PRIMARY KEY (name)
);
CREATE TABLE outbox (
	id INTEGER NOT NULL, 
	media_id VARCHAR(36) NOT NULL, 
	created_at FLOAT NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (media_id), 
	FOREIGN KEY(media_id) REFERENCES media (id)
);
INSERT INTO counters (name, value) VALUES ('mirror_revision', 0);
