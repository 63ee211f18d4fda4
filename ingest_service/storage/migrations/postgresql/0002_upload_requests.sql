-- upload_requests: request ids of uploads (AIP-155)
CREATE TABLE upload_requests (
    request_id VARCHAR(36) PRIMARY KEY,
    digest VARCHAR(64) NOT NULL,
    media_ids JSON NOT NULL,
    message TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX upload_requests_created_at ON upload_requests (created_at);
