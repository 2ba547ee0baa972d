"""POST /score and its deprecated alias /v1/score."""
