"""Datasets: the offline story corpus, user-supplied text pinned by checksum, token arrays."""
