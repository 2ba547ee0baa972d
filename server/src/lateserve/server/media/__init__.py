"""Media inputs (images) for every family: fetch under policy, decode with limits, normalise."""
