"""Adapter files: this package's format and PEFT's, written so a reader never sees half a save.

    native.py       save_adapter / load_adapter; export_peft / import_peft enter here
    peft.py         PEFT's LoRA format: the update folded into one LoRA per layer
    files.py        the write protocol: two files, a lock, a commit record
    lock.py         the directory's lock: waiting for it, whose it is, lock_timeout
    errors.py       AdapterError
    checks.py       what an adapter's config and tensors must satisfy (both formats)
    kind_entries.py what our format records of an Embedding, Conv or attention base
    peft_checks.py  what a PEFT adapter must satisfy to be imported
    base_models.py  which base model an adapter belongs to
"""
