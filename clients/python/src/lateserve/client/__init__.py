"""Python client for the lateserve.v1 gRPC services."""
