"""``ditkit.runtime``: samplers, export and engines (see the open issues)."""
