"""Fault injection on adapter files and saves: a damaged adapter is refused with AdapterError and
leaves the model untouched, or loads exactly what was saved; never a different model.

test_serialization.py has one case of each kind with its exact message; here every byte, bit,
tensor and stage of a save is tried on a small adapter. Files are edited in place (no O_TRUNC),
which keeps thousands of trials fast."""
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import soslora_ext as sl
from soslora_ext.formats.native import CONFIG_NAME, PREVIOUS_WEIGHTS_NAME, WEIGHTS_NAME

from conftest import overwrite, restamp_adapter

TESTS = Path(__file__).resolve().parent


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down, self.head = nn.Linear(6, 5), nn.Linear(5, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.down(torch.tanh(self.up(x)))))


def base():
    torch.manual_seed(0)  # the same base weights every time
    return Tiny()


def adapted_tiny(version=0):
    """Tiny with channel scales, a gate and a head saved whole (every kind of tensor), every
    value drawn from `version`."""
    model = sl.apply_sos_lora(base(), ["up", "down"], modules_to_save=["head"], num_experts=2,
                              rank=4, alpha=8.0, scale_mode="channel", gate=True, dropout=0.1)
    torch.manual_seed(1000 + version)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
        for _, layer in sl.sos_layers(model):
            layer.gate_temperature.fill_(1.3)
            layer.ortho_lambda.fill_(0.004)
    return model


def same_model(a, b):
    """Bit-identical state, the same layer hyperparameters and the same trainable set."""
    sa, sb = a.state_dict(), b.state_dict()
    return (sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
            and [(n, l.config) for n, l in sl.sos_layers(a)] ==
            [(n, l.config) for n, l in sl.sos_layers(b)]
            and [n for n, p in a.named_parameters() if p.requires_grad] ==
            [n for n, p in b.named_parameters() if p.requires_grad])


class Loader:
    """Loads a directory into a fresh Tiny and classifies the outcome: 'refused' (AdapterError,
    the model untouched) or 'same' (exactly `reference`). Anything else fails the test."""

    def __init__(self, reference):
        self.reference, self.fresh = reference, base()
        self.pristine = {k: v.clone() for k, v in self.fresh.state_dict().items()}

    def __call__(self, directory):
        try:
            sl.load_adapter(self.fresh, directory)
        except sl.AdapterError:
            after = self.fresh.state_dict()
            assert not list(sl.sos_layers(self.fresh))
            assert after.keys() == self.pristine.keys()
            assert all(torch.equal(after[k], self.pristine[k]) for k in after)
            return "refused"
        assert same_model(self.fresh, self.reference), "a damaged adapter loaded differently"
        self.fresh = base()
        return "same"


@pytest.fixture
def saved(tmp_path):
    """(directory, the loaded reference model, Loader, weights bytes, config bytes)."""
    directory = sl.save_adapter(adapted_tiny(), tmp_path / "adapter")
    reference = sl.load_adapter(base(), directory)
    assert same_model(reference, adapted_tiny())
    return (directory, Loader(reference), (directory / WEIGHTS_NAME).read_bytes(),
            (directory / CONFIG_NAME).read_bytes())


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def header_length(weights: bytes) -> int:
    """Bytes of the safetensors header: an 8-byte length, then that much JSON."""
    return 8 + int.from_bytes(weights[:8], "little")


# ---- the weights file ------------------------------------------------------------------------
def test_every_truncation_of_the_weights_is_refused(saved):
    directory, load, weights, config = saved
    for length in range(len(weights)):
        overwrite(directory / WEIGHTS_NAME, weights[:length])
        assert load(directory) == "refused", length
        restamp_adapter(directory)  # checksums match: the file itself must be found unreadable
        assert load(directory) == "refused", length
        overwrite(directory / CONFIG_NAME, config)


def test_every_byte_of_the_weights_with_a_bit_flipped_is_refused(saved):
    # One bit per byte, a different bit in each byte: the checksum catches every change.
    directory, load, weights, _ = saved
    for i in range(len(weights)):
        overwrite(directory / WEIGHTS_NAME, flip(weights, 8 * i + i % 8))
        assert load(directory) == "refused", i


def test_every_header_bit_flip_with_matching_checksums_is_refused_or_harmless(saved):
    # A writer that damaged the safetensors header and then recorded its checksum: the parser
    # and the load checks must still refuse it, unless the flip changed nothing that is used
    # (e.g. the header's free-form metadata).
    directory, load, weights, config = saved
    outcomes = {"refused": 0, "same": 0}
    for bit in range(8 * header_length(weights)):
        overwrite(directory / WEIGHTS_NAME, flip(weights, bit))
        restamp_adapter(directory)
        outcomes[load(directory)] += 1
        overwrite(directory / CONFIG_NAME, config)
    assert outcomes["refused"] > 0.9 * sum(outcomes.values()), outcomes


# ---- the config file -------------------------------------------------------------------------
def test_every_config_bit_flip_and_truncation_is_refused(saved):
    # Without the config's own checksum, 184 of these flips loaded a different model (a changed
    # dropout, alpha, init_gain, loraplus_ratio, scale_anchor or uniform_prior).
    directory, load, _, config = saved
    for bit in range(8 * len(config)):
        overwrite(directory / CONFIG_NAME, flip(config, bit))
        assert load(directory) == "refused", bit
    for length in range(len(config)):
        overwrite(directory / CONFIG_NAME, config[:length])
        # Only cutting the final newline changes nothing.
        assert load(directory) == ("same" if config[length:].isspace() else "refused"), length


# ---- tensors: wrong dtype, missing, extra, wrong shape, non-finite ---------------------------
def rewrite(directory, edit):
    """Edit the saved tensors and re-record the checksums, as a buggy writer would."""
    tensors = load_file(str(directory / WEIGHTS_NAME))
    edit(tensors)
    save_file(tensors, str(directory / WEIGHTS_NAME))
    restamp_adapter(directory)


def _set_one(t, value):
    t = t.clone()
    t.view(-1)[torch.randint(t.numel(), ()).item()] = value
    return t


TENSOR_FAULTS = {
    "float64": lambda t: t.double(),
    "float16": lambda t: t.half(),
    "bfloat16": lambda t: t.bfloat16(),
    "int32": lambda t: t.int(),
    "one more row": lambda t: torch.cat([t, t[:1]]) if t.dim() else t.reshape(1),
    "transposed": lambda t: t.t().contiguous() if t.dim() == 2 and t.shape[0] != t.shape[1]
    else t.reshape(1, -1),
    "nan": lambda t: _set_one(t, float("nan")),
    "inf": lambda t: _set_one(t, float("inf")),
    "-inf": lambda t: _set_one(t, float("-inf")),
    "missing": None,
}


@pytest.mark.parametrize("fault", TENSOR_FAULTS)
def test_each_tensor_with_a_fault_is_refused(saved, fault):
    directory, load, weights, config = saved
    keys = sorted(load_file(str(directory / WEIGHTS_NAME)))
    assert len(keys) == 16  # 7 per adapted layer (factors, scales, gate, buffers) + the head's 2
    change = TENSOR_FAULTS[fault]
    for key in keys:
        rewrite(directory, lambda t: t.pop(key) if change is None else
                t.update({key: change(t[key])}))
        assert load(directory) == "refused", key
        overwrite(directory / WEIGHTS_NAME, weights)
        overwrite(directory / CONFIG_NAME, config)


@pytest.mark.parametrize("edit", [
    lambda d: rewrite(d, lambda t: t.update(stray=torch.ones(2))),
    lambda d: rewrite(d, lambda t: t.update({"up.lora_C": torch.ones(4, 6)})),
    lambda d: rewrite(d, lambda t: t.update({"head.scale": torch.ones(2)})),
    lambda d: restamp_adapter(d, lambda c: c["modules"].update(
        head={**c["modules"]["up"], "in_features": 3, "out_features": 2})),
    lambda d: restamp_adapter(d, lambda c: c["modules_to_save"].update(down=["weight"])),
], ids=["stray tensor", "tensor under a layer", "tensor under the head", "layer in the config",
        "module to save in the config"])
def test_extra_tensors_and_entries_are_refused(saved, edit):
    directory, load, _, _ = saved
    edit(directory)
    assert load(directory) == "refused"


# ---- saves that fail or are killed -----------------------------------------------------------
def test_save_refuses_non_finite_values_and_keeps_the_previous_adapter(saved):
    directory, load, weights, config = saved
    model = adapted_tiny(version=1)
    with torch.no_grad():
        model.down.lora_B[1, 2] = float("nan")  # e.g. a diverged training step
    with pytest.raises(sl.AdapterError, match="'down.lora_B' has non-finite values"):
        sl.save_adapter(model, directory)
    assert sorted(p.name for p in directory.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert (directory / WEIGHTS_NAME).read_bytes() == weights
    assert (directory / CONFIG_NAME).read_bytes() == config


def test_save_with_unserialisable_metadata_keeps_the_previous_adapter(saved):
    directory, load, weights, config = saved
    with pytest.raises(TypeError, match="not JSON serializable"):
        sl.save_adapter(adapted_tiny(version=1), directory, metadata={"step": object()})
    assert sorted(p.name for p in directory.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert (directory / WEIGHTS_NAME).read_bytes() == weights
    assert load(directory) == "same"


# The child saves version 1 over version 0 and stops itself (SIGSTOP) at one stage of the save;
# the test then kills it (SIGKILL). No timing is involved: the kill lands exactly there.
KILL_CHILD = r"""
import os, signal, sys
sys.path[:0] = sys.argv[3:]  # this folder, and tests/ for conftest
import soslora_ext as sl
from test_faults import adapted_tiny

directory, stage = sys.argv[1], sys.argv[2]
stop = lambda: os.kill(os.getpid(), signal.SIGSTOP)
real_open, real_write, real_fsync, real_replace = os.open, os.write, os.fsync, os.replace
paths, calls = {}, {"replace": 0}

def open_(path, flags, *args, **kwargs):
    fd = real_open(path, flags, *args, **kwargs)
    paths[fd] = os.path.basename(path)
    return fd

def write(fd, data):
    name = paths.get(fd, "")
    if (stage, name.split(".")[1:2]) in (("writing weights", ["adapter_model"]),
                                         ("writing config", ["adapter_config"])):
        real_write(fd, bytes(data[: len(data) // 2]))  # half of it has reached the disk
        stop()
    return real_write(fd, data)

def fsync(fd):
    if stage == "weights written" and paths.get(fd, "").startswith(".adapter_model"):
        stop()
    real_fsync(fd)

def replace(src, dst):
    calls["replace"] += 1
    if (stage, calls["replace"]) in (("before renames", 1), ("between renames", 2)):
        stop()
    real_replace(src, dst)
    if stage == "after renames" and calls["replace"] == 2:
        stop()

os.open, os.write, os.fsync, os.replace = open_, write, fsync, replace
sl.save_adapter(adapted_tiny(version=1), directory)
sys.exit("the save ran to the end without stopping")
"""

# stage -> the version that must load after the kill
KILL_STAGES = {"writing weights": 0, "weights written": 0, "writing config": 0,
               "before renames": 0, "between renames": 0, "after renames": 1}


def wait_until_stopped(proc, timeout=300) -> bool:
    timer = threading.Timer(timeout, proc.kill)  # never hang the suite
    timer.start()
    try:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
    finally:
        timer.cancel()
    return os.WIFSTOPPED(status)


@pytest.mark.parametrize("stage", KILL_STAGES)
def test_save_killed_at_each_stage_leaves_a_whole_adapter(tmp_path, stage):
    directory = sl.save_adapter(adapted_tiny(version=0), tmp_path / "adapter")
    log = tmp_path / "child.log"
    with open(log, "w") as err:
        child = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(directory), stage,
                                  str(TESTS), str(TESTS.parent)], stderr=err)
    assert wait_until_stopped(child), log.read_text()[-3000:]
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert Loader(adapted_tiny(version=KILL_STAGES[stage]))(directory) == "same"
    # Whatever the killed save left behind, the next save and load work.
    sl.save_adapter(adapted_tiny(version=2), directory)
    assert Loader(adapted_tiny(version=2))(directory) == "same"
    assert not (directory / PREVIOUS_WEIGHTS_NAME).exists()


# A writer that saves larger adapters in a loop, killed at random moments (a fixed sequence of
# delays): whatever the moment, the directory loads as one whole saved version, bit-exactly.
RANDOM_KILL_CHILD = r"""
import json, os, random, signal, sys, time
import torch
torch.set_num_threads(1)  # no thread pool: safe to fork
import torch.nn as nn
import soslora_ext as sl

def base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 256))

def adapted(version):
    model = sl.apply_sos_lora(base(), ["0", "1"], num_experts=4, rank=64)
    torch.manual_seed(version)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    return model

directory, rounds = sys.argv[1], int(sys.argv[2])
sl.save_adapter(adapted(0), directory, metadata={"version": 0})
delays, loaded_versions = random.Random(0), []
for r in range(rounds):
    first = 1000 * (r + 1)
    pid = os.fork()
    if pid == 0:  # the writer
        version = first
        while True:
            sl.save_adapter(adapted(version), directory, metadata={"version": version})
            version += 1
    time.sleep(delays.uniform(0.0, 0.3))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    model = sl.load_adapter(base(), directory)
    version = sl.formats.native.read_adapter_config(directory)["metadata"]["version"]
    want = adapted(version).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items()), version
    loaded_versions.append(version - first if version >= first else -1)
# Interrupted saves leave temporaries; the next save deletes them.
sl.save_adapter(adapted(1), directory)
left = sorted(os.listdir(directory))
assert left == ["adapter_config.json", "adapter_model.safetensors"], left
print(json.dumps(loaded_versions))
"""


def test_writer_killed_at_random_moments_leaves_a_whole_adapter(tmp_path):
    rounds = 25
    result = subprocess.run([sys.executable, "-c", RANDOM_KILL_CHILD, str(tmp_path / "adapter"),
                             str(rounds)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    completed = json.loads(result.stdout.splitlines()[-1])  # saves completed by each writer
    assert len(completed) == rounds
    print("saves completed before each kill:", completed)


# ---- bad input to the layer ------------------------------------------------------------------
@pytest.mark.parametrize("x_dtype", [torch.float64, torch.bfloat16, torch.int64])
def test_input_of_another_dtype_is_refused_naming_x(x_dtype):
    layer = sl.SOSLinear(nn.Linear(8, 6), num_experts=2, rank=4)
    x = torch.ones(3, 8, dtype=x_dtype)
    with pytest.raises(TypeError, match=f"SOSLinear: input x is {x_dtype}"):
        layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts: no error
        assert layer(torch.randn(3, 8, dtype=torch.bfloat16)).shape == (3, 6)
