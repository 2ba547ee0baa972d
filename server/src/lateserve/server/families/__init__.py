"""Model families: plug-ins that detect, load, tokenize for and run one kind of checkpoint."""
