"""DistributedDataParallel and FSDP2 (gloo, 2 CPU processes) around models with SOS and CPS
adapters."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

import soslora_ext as sl
from soslora_ext.layers.distributed import full

WORLD = 2
STEPS = 4


def build(seed: int = 0) -> torch.nn.Module:
    """A small Llama with SOS and CPS adapters (CPS repartitioning is tested separately, on a
    problem whose statistics have a clear structure)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    sl.apply_sos_lora(model, ["q_proj", "v_proj", "down_proj"], num_experts=4, rank=8,
                      scale_mode="channel", gate=True)
    sl.apply_cps_lora(model, ["k_proj", "up_proj"], num_clusters=2, rank=2, alpha=2.0,
                      init_partition="random")
    with torch.no_grad():
        for _, layer in sl.adapter_layers(model):
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


def spawn(worker, tmp_path, *args):
    """Run `worker(rank, init_file, *args)` on WORLD processes. A process killed by a signal
    (gloo's teardown has aborted an exiting process here, once, under load) is retried once
    with a fresh rendezvous; failed assertions and Python errors are never retried."""
    for attempt in range(2):
        init_file = tmp_path / f"init-{attempt}"
        try:
            mp.spawn(worker, args=(str(init_file), *args), nprocs=WORLD, join=True)
            return
        except mp.ProcessExitedException as e:
            if attempt == 1 or not e.signal_name:
                raise


def _worker(rank, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        model = torch.nn.parallel.DistributedDataParallel(build())
        params = train(model, batches(), rank, WORLD)
        if rank == 0:
            torch.save(params, out_file)
        dist.barrier()  # tear gloo down together: an early exit can abort the other rank
    finally:
        dist.destroy_process_group()


def test_ddp_equals_single_process_on_the_global_batch(tmp_path):
    out_file = tmp_path / "ddp.pt"
    spawn(_worker, tmp_path, str(out_file))
    ddp = torch.load(out_file)
    single = train(build(), batches())
    initial = {n: p for n, p in build().named_parameters() if p.requires_grad}
    assert ddp.keys() == single.keys() == initial.keys() and len(ddp) > 0
    factors = [n for n in single if n.endswith(("lora_A", "lora_B"))]
    assert factors and all(not torch.equal(single[n], initial[n]) for n in factors)
    for name in single:
        # Same math, different summation order (all-reduce): float32 rounding only.
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-5, atol=1e-6, msg=name)


def planted_cps(seed: int = 0):
    """A CPSLinear (4 clusters, rank 2) on a zero 48 -> 64 base, the target a sum of 4 shuffled
    rank-2 blocks, and a fixed stream of global batches."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = torch.randperm(64, generator=g) % 4, torch.randperm(48, generator=g) % 4
    target = torch.zeros(64, 48)
    for c in range(4):
        block = torch.randn(int((rows == c).sum()), 2, generator=g) @ \
            torch.randn(2, int((cols == c).sum()), generator=g)
        target[(rows == c).nonzero()[:, 0][:, None], (cols == c).nonzero()[:, 0][None, :]] = block
    torch.manual_seed(seed)
    base = torch.nn.Linear(48, 64, bias=False)
    torch.nn.init.zeros_(base.weight)
    layer = sl.CPSLinear(base, num_clusters=4, rank=2, alpha=4.0, repartition_every=6,
                         statistics_steps=3)
    inputs = [torch.randn(128 * WORLD, 48, generator=g) for _ in range(12)]
    return layer, target, inputs


def fit_planted(model, target, inputs, rank=0, world=1):
    """Adam on this rank's share of each batch with the repartition schedule (repartitions
    after steps 3 and 9); returns the factors, the partition and the repartition count."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    schedule = sl.RepartitionSchedule(model, opt)
    for x in inputs:
        share = x.chunk(world)[rank]
        loss = (model(share) - share @ target.T).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    layer = model.module if world > 1 else model
    return dict(lora_A=layer.lora_A.detach().clone(), lora_B=layer.lora_B.detach().clone(),
                partition=torch.cat(layer.partition()), repartitions=int(layer.repartition_count))


def _cps_worker(rank, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        layer, target, inputs = planted_cps()
        state = fit_planted(torch.nn.parallel.DistributedDataParallel(layer), target, inputs,
                            rank, WORLD)
        if rank == 0:
            torch.save(state, out_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_cps_repartitions_like_one_process(tmp_path):
    """The gradient statistics are summed over ranks, so both ranks pick the partition that
    one process picks on the global batch, and the re-fitted factors agree."""
    spawn(_cps_worker, tmp_path, str(tmp_path / "cps.pt"))
    ddp = torch.load(tmp_path / "cps.pt")
    single = fit_planted(*planted_cps())
    assert ddp["repartitions"] == single["repartitions"] == 2
    assert torch.equal(ddp["partition"], single["partition"])
    for name in ("lora_A", "lora_B"):
        # float32 rounding, amplified a little by the re-fits' SVDs
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-5, msg=name)


def _fsdp_worker(rank, init_file, out_dir):
    from pathlib import Path

    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        model = build()
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        params = train(model, batches(), rank, WORLD)  # DTensor shards
        layer = dict(sl.sos_layers(model))["model.layers.0.self_attn.q_proj"]
        lam = layer.ortho_lambda.item()
        penalty = sl.ortho_penalty(model)  # gathers the sharded lora_A on every rank
        penalty.backward()  # and is differentiable through the gather
        out = Path(out_dir)
        sl.save_adapter(model, out / f"sharded-rank{rank}")
        sl.export_peft(model, out / f"peft-rank{rank}")
        gathered = {n: full(p) for n, p in params.items()}  # partitions are not sharded
        if rank == 0:
            torch.save(dict(params=gathered, penalty=penalty.item(), lam=lam), out / "fsdp.pt")
        dist.barrier()  # tear gloo down together: an early exit can abort the other rank
    finally:
        dist.destroy_process_group()


def test_fsdp2_trains_schedules_and_saves_like_unsharded(tmp_path):
    from safetensors.torch import load_file

    spawn(_fsdp_worker, tmp_path, str(tmp_path))
    result = torch.load(tmp_path / "fsdp.pt")
    single_model = build()
    single = train(single_model, batches())
    for name in single:
        torch.testing.assert_close(result["params"][name], single[name], rtol=1e-5, atol=1e-6,
                                   msg=name)
    assert result["lam"] == pytest.approx(0.05)
    assert result["penalty"] == pytest.approx(sl.ortho_penalty(single_model).item(), rel=1e-4)
    # Rank 0 wrote, rank 1 wrote nothing; the files equal an unsharded save of the same values.
    assert not (tmp_path / "sharded-rank1").exists() and not (tmp_path / "peft-rank1").exists()
    unsharded = build()
    with torch.no_grad():
        for name, p in unsharded.named_parameters():
            if name in result["params"]:
                p.copy_(result["params"][name])
        for (_, a), (_, b) in zip(sl.sos_layers(unsharded), sl.sos_layers(single_model)):
            a.ortho_lambda.copy_(b.ortho_lambda)
    sl.save_adapter(unsharded, tmp_path / "unsharded")
    sl.export_peft(unsharded, tmp_path / "unsharded-peft")
    pairs = (("sharded-rank0", "unsharded"), ("peft-rank0", "unsharded-peft"))
    for sharded_dir, plain_dir in pairs:
        got = load_file(str(tmp_path / sharded_dir / "adapter_model.safetensors"))
        want = load_file(str(tmp_path / plain_dir / "adapter_model.safetensors"))
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in got), sharded_dir


def _zero2_worker(rank, init_file, out_file):
    import os

    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank))
    import deepspeed

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)  # DeepSpeed uses a process group it finds
    try:
        model = build()
        params = [p for p in model.parameters() if p.requires_grad]
        # The same SGD as train(); ZeRO-2 partitions its gradients and state across the ranks.
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(params, lr=0.1), model_parameters=params,
            config={"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                    "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True})
        assert engine.zero_optimization_stage() == 2
        schedule = sl.OrthoSchedule(model, lambda_max=0.05, delay=0.0, ramp=0.5,
                                    total_steps=STEPS)
        for ids in batches():
            share = ids.chunk(WORLD)[rank]
            engine.backward(engine(input_ids=share, labels=share).loss)
            engine.step()
            schedule.step()
        penalty = sl.ortho_penalty(model).item()
        sl.save_adapter(model, f"{out_file}.adapter-rank{rank}")  # every rank; rank 0 writes
        if rank == 0:
            torch.save(dict(params={n: p.detach().clone() for n, p in model.named_parameters()
                                    if p.requires_grad}, penalty=penalty), out_file)
        dist.barrier()  # tear gloo down together: an early exit can abort the other rank
    finally:
        dist.destroy_process_group()


def test_deepspeed_zero2_equals_single_process_on_the_global_batch(tmp_path):
    # DeepSpeed's CPU accelerator with gloo; it compiles a small shared-memory op on first use.
    pytest.importorskip("deepspeed")
    out_file = tmp_path / "zero2.pt"
    spawn(_zero2_worker, tmp_path, str(out_file))
    zero2 = torch.load(out_file)
    single_model = build()
    single = train(single_model, batches())
    assert zero2["params"].keys() == single.keys() and len(single) > 0
    for name in single:
        torch.testing.assert_close(zero2["params"][name], single[name], rtol=1e-5, atol=1e-6,
                                   msg=name)
    assert zero2["penalty"] == pytest.approx(sl.ortho_penalty(single_model).item(), rel=1e-4)
    # Rank 0 saved what it trained; rank 1 wrote nothing.
    assert not (tmp_path / "zero2.pt.adapter-rank1").exists()
    loaded = sl.load_adapter(LlamaForCausalLM(single_model.config),
                             tmp_path / "zero2.pt.adapter-rank0")
    for name, p in loaded.named_parameters():
        if name in single:
            assert torch.equal(p, zero2["params"][name]), name
