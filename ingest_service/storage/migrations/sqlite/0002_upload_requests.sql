-- upload_requests: request ids of uploads (AIP-155)
CREATE TABLE upload_requests (
	request_id VARCHAR(36) NOT NULL, 
	digest VARCHAR(64) NOT NULL, 
	media_ids JSON NOT NULL, 
	message VARCHAR NOT NULL, 
	created_at FLOAT NOT NULL, 
	PRIMARY KEY (request_id)
);
CREATE INDEX upload_requests_created_at ON upload_requests (created_at);
