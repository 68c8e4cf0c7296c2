"""``ditkit.train``: experiments -> runs (data, objectives, loop, checkpoints, distributed,
fine-tuning, evaluation, FID, the demo job)."""
