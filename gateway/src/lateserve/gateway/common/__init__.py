"""Pieces every route family shares: base schemas, input translation and the HTTP helpers."""
