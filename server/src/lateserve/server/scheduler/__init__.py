"""Scheduler: token-budget batch building and dispatch to workers (no proto, no torch)."""
