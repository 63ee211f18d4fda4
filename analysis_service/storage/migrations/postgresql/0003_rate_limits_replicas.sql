-- rate_limits, replicas: one rate limit per upstream API for every replica, and each replica's heartbeat
CREATE TABLE rate_limits (
    api TEXT PRIMARY KEY,
    theoretical_arrival DOUBLE PRECISION NOT NULL,
    paused_until DOUBLE PRECISION NOT NULL,
    quota_errors BIGINT NOT NULL,
    window_start DOUBLE PRECISION NOT NULL,
    window_calls BIGINT NOT NULL,
    previous_window_calls BIGINT NOT NULL
);
CREATE TABLE replicas (
    replica_id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    workers_total INTEGER NOT NULL,
    workers_busy INTEGER NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    last_seen DOUBLE PRECISION NOT NULL
);
