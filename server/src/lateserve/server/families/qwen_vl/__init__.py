"""Qwen2-VL / Qwen3-VL vision input preparation that runs in the torch-free server process."""
