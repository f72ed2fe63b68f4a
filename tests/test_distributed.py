"""DistributedDataParallel (gloo, 2 CPU processes) around a model with SOS adapters."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

import soslora_ext as sl

WORLD = 2
STEPS = 4


def build(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    sl.apply_sos_lora(model, ["q_proj", "v_proj", "down_proj"], num_experts=4, rank=8,
                      scale_mode="channel", gate=True)
    with torch.no_grad():
        for _, layer in sl.sos_layers(model):
            layer.lora_B.normal_(0, 0.1)
    return model


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (4 * WORLD, 12), generator=g) for _ in range(STEPS)]


def train(model, inputs, rank=0, world=1):
    """STEPS of SGD on this rank's share of each global batch, with the lambda schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    schedule = sl.OrthoSchedule(model, lambda_max=0.05, delay=0.0, ramp=0.5, total_steps=STEPS)
    for ids in inputs:
        share = ids.chunk(world)[rank]
        loss = model(input_ids=share, labels=share).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    return {n.removeprefix("module."): p.detach().clone()
            for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        model = torch.nn.parallel.DistributedDataParallel(build())
        params = train(model, batches(), rank, WORLD)
        if rank == 0:
            torch.save(params, out_file)
    finally:
        dist.destroy_process_group()


def test_ddp_equals_single_process_on_the_global_batch(tmp_path):
    out_file = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(out_file)), nprocs=WORLD, join=True)
    ddp = torch.load(out_file)
    single = train(build(), batches())
    initial = {n: p for n, p in build().named_parameters() if p.requires_grad}
    assert ddp.keys() == single.keys() == initial.keys() and len(ddp) > 0
    factors = [n for n in single if n.endswith(("lora_A", "lora_B"))]
    assert factors and all(not torch.equal(single[n], initial[n]) for n in factors)
    for name in single:
        # Same math, different summation order (all-reduce): float32 rounding only.
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-5, atol=1e-6, msg=name)
