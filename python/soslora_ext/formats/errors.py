"""The error of everything that reads, writes or applies adapter files (its own module, so that
files.py and lock.py both raise it)."""


class AdapterError(ValueError):
    """An adapter directory that cannot be saved, read or applied to this model."""
