"""Reference implementations (PyLate, FlagEmbedding, transformers) run in their own venvs."""
