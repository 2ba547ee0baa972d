"""lateserve REST gateway: JSON <-> lateserve.v1 gRPC translation only (never imports torch or the server)."""
