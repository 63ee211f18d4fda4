"""What the gateway knows beyond one request: shared upstream watches, sessions, throughput."""
