"""The adapted layers and what acts on them.

    base.py         AdapterLinear: the frozen base all layers share; merge and unmerge
    bases.py        what a base is: linear layers and the other kinds, their matrix view, checks
    kinds.py        Embedding, Conv1d/2d/3d and MultiheadAttention bases: views and forwards
    sos.py          SOSLinear: SOS-LoRA's K static, always-on experts
    cps.py          CPSLinear: CPS-LoRA's cluster-local blocks
    cps_kinds.py    CPS-LoRA over a convolution or an embedding: each cluster on its own channels
    partition.py    CPS-LoRA's partition: gradient sketch, co-clustering, captured energy
    structure.py    does an update have CPS-LoRA's structure? block energy against a null
    schedules.py    training schedules: SOS-LoRA's recipe, CPS-LoRA's repartitions
    config.py       SOSConfig, CPSConfig and the presets
    quantized.py    bitsandbytes 4/8-bit bases
    merge_guard.py  every in-place write of an update into a weight
    merged_state.py a merged layer's state dict: its weight with the update it holds
    sharing.py      which tensors share memory with a weight; merged-weight fingerprints
    bypass.py       parents that read an adapted layer's weight instead of calling it
    model.py        apply_sos_lora / apply_cps_lora, merge_and_unload, penalties, counts
    distributed.py  sharded parameters and reductions
"""
