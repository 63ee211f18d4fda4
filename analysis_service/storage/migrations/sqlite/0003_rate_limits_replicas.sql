-- rate_limits, replicas: one rate limit per upstream API for every replica, and each replica's heartbeat
CREATE TABLE rate_limits (
    api VARCHAR NOT NULL PRIMARY KEY,
    theoretical_arrival FLOAT NOT NULL,
    paused_until FLOAT NOT NULL,
    quota_errors BIGINT NOT NULL,
    window_start FLOAT NOT NULL,
    window_calls BIGINT NOT NULL,
    previous_window_calls BIGINT NOT NULL
);
CREATE TABLE replicas (
    replica_id VARCHAR NOT NULL PRIMARY KEY,
    host VARCHAR NOT NULL,
    pid INTEGER NOT NULL,
    workers_total INTEGER NOT NULL,
    workers_busy INTEGER NOT NULL,
    started_at FLOAT NOT NULL,
    last_seen FLOAT NOT NULL
);
