"""``ditkit.training``: experiments -> runs (objectives' losses, loop, checkpoints, distributed,
fine-tuning, the evaluation hook of a run, the demo job)."""
