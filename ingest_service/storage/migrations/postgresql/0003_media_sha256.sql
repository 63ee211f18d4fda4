-- media_sha256: an index for the blob sweep
CREATE INDEX media_sha256 ON media (sha256);
