"""The analysis service's gRPC layer."""
