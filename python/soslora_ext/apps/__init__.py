"""Applications built on the library (not imported by it).

    main_job.py   fine-tune the real all-MiniLM-L6-v2 five ways (``python -m soslora_ext main-job``)
    cps_check.py  the CPS-LoRA structure check as a table and a PNG (``cps-check``)
    demo.py       a synthetic end-to-end run in seconds (``python -m soslora_ext demo``)
    finetune.py   a plain PyTorch fine-tuning loop (the ``train`` command uses it)
    data.py       the ``filekinds`` classification task and training-data readers
"""
