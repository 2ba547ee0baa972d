"""Worker processes that hold model replicas, and the pool that supervises them."""
