"""lateserve gRPC server. Importing this package must not import torch (workers do that)."""

__version__ = "0.1.0"
