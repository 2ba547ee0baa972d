"""Engine: the services' one door to admission, tokenization, caching and batching (no proto, no torch)."""
