"""The "auto" CUDA path's rule (csrc/dispatch.cpp): the faster of the kernel and ATen, measured
once per shape class and kept; forced paths; ATen under deterministic algorithms and inside a
CUDA-graph capture that has nothing cached. Exercised on the CPU through the rule itself, with
timings the test supplies; tests/ops/test_cuda.py checks the real measurements on a GPU."""
import pytest
import torch

import soslora_ext as sl
from soslora_ext import ops


class Timings:
    """time_ms(path) for the rule: fixed times per path, and a count of the calls."""

    def __init__(self, kernels: float, aten: float):
        self.ms = {"kernels": kernels, "aten": aten}
        self.calls = {"kernels": 0, "aten": 0}

    def __call__(self, path: str) -> float:
        self.calls[path] += 1
        return self.ms[path]


@pytest.fixture(autouse=True)
def fresh_choices():
    ops.clear_cuda_choices()
    previous = ops.set_cuda_path("auto")
    yield
    ops.set_cuda_path(previous)
    ops.clear_cuda_choices()


@pytest.mark.parametrize("kernels, aten, chosen", [(1.0, 2.0, "kernels"), (2.0, 1.0, "aten"),
                                                   (1.0, 1.0, "aten")])
def test_auto_takes_the_faster_and_a_tie_goes_to_aten(kernels, aten, chosen):
    timings = Timings(kernels, aten)
    assert sl._C.decide_for_tests("op cuda:0 bf16 8192x4096x64", False, timings) == chosen
    # A warm-up call each, then the timed calls, alternating.
    assert timings.calls["kernels"] == timings.calls["aten"] >= 2
    assert ops.cuda_choices() == {"op cuda:0 bf16 8192x4096x64": (chosen, kernels, aten)}


def test_a_choice_is_measured_once_per_shape_class():
    first = Timings(1.0, 2.0)
    assert sl._C.decide_for_tests("a", False, first) == "kernels"
    again = Timings(5.0, 1.0)  # what a second measurement would say: not asked
    assert sl._C.decide_for_tests("a", False, again) == "kernels"
    assert again.calls == {"kernels": 0, "aten": 0}
    assert sl._C.decide_for_tests("b", False, again) == "aten"  # another class measures
    ops.clear_cuda_choices()
    assert sl._C.decide_for_tests("a", False, again) == "aten"


def test_the_slowest_of_noisy_timings_does_not_decide():
    """The smallest of each path's timings counts: one slow outlier does not flip a choice."""
    times = iter([9.0, 9.0, 50.0, 2.0, 1.0, 2.0, 1.0, 2.0])  # warm-ups, then k, a, k, a, ...

    def time_ms(path):
        return next(times)
    assert sl._C.decide_for_tests("noisy", False, time_ms) == "kernels"


@pytest.mark.parametrize("path", ["kernels", "aten"])
def test_a_forced_path_is_taken_without_measuring(path):
    ops.set_cuda_path(path)
    timings = Timings(1.0, 2.0)
    assert sl._C.decide_for_tests("forced", False, timings) == path
    assert timings.calls == {"kernels": 0, "aten": 0} and ops.cuda_choices() == {}


def test_deterministic_algorithms_take_aten_without_measuring():
    timings = Timings(1.0, 2.0)
    torch.use_deterministic_algorithms(True)
    try:
        assert sl._C.decide_for_tests("det", False, timings) == "aten"
    finally:
        torch.use_deterministic_algorithms(False)
    assert timings.calls == {"kernels": 0, "aten": 0} and ops.cuda_choices() == {}


def test_a_graph_capture_uses_the_cached_choice_or_aten_without_measuring():
    timings = Timings(1.0, 2.0)
    assert sl._C.decide_for_tests("capture", True, timings) == "aten"
    assert timings.calls == {"kernels": 0, "aten": 0} and ops.cuda_choices() == {}
    assert sl._C.decide_for_tests("capture", False, timings) == "kernels"
    assert sl._C.decide_for_tests("capture", True, Timings(9.0, 1.0)) == "kernels"


def test_a_failing_timing_raises_and_caches_nothing():
    def broken(path):
        raise RuntimeError("launch failed")
    with pytest.raises(RuntimeError, match="launch failed"):
        sl._C.decide_for_tests("broken", False, broken)
    assert ops.cuda_choices() == {}


def test_bad_path_is_refused_by_name():
    with pytest.raises(ValueError, match="path must be 'auto', 'kernels' or 'aten'"):
        ops.set_cuda_path("fast")
    assert sl._C.cuda_path() == "auto"
