"""Hand-written helpers for the lateserve.v1 wire format, shared by server, gateway and client."""
