"""Integrations with other libraries, each imported only when used.

    transformers.py  SOSLoRACallback, CPSLoRACallback for the transformers Trainer
"""


def __getattr__(name):
    # transformers is imported only when a callback is asked for.
    if name in ("SOSLoRACallback", "CPSLoRACallback"):
        from . import transformers
        return getattr(transformers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
