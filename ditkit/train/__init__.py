"""``ditkit.train``: experiment specs and the training loop (see the open issues)."""
