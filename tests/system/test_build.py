"""The build: CUDA sources are compiled whenever torch has CUDA and nvcc is present, and the
module links the shared C++ runtime and unwinder whatever flags the environment carries.

The rule (docs/building.md, "How the module links the C++ runtime"): the module's NEEDED entries
list libstdc++.so.6 and libgcc_s.so.1, it defines no __cxa_*, __gxx_personality_* or _Unwind_*
symbol, and it imports _Unwind_Resume. A module with a private libstdc++ raises errors whose
numbers are lost ("A.size(0) = "); one with a private unwinder aborts on every op error.

The tests marked slow build the package (CPU-only, with ninja) into a temporary directory, once
per flag set, in one to three minutes each on 2 cores; CI runs them with the rest of the suite.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import soslora_ext as sl

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
OPS = ["lowrank_forward", "lowrank_grad_hidden", "lowrank_grad_A", "lowrank_grad_x",
       "dropout_mask", "ortho_penalty", "ortho_penalty_grad_", "merge_into_"]
NVCC = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
CMAKE = shutil.which("cmake", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
NINJA = shutil.which("ninja", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
CXX = shutil.which("g++") or shutil.which("c++")
CHECK = ROOT / "cmake" / "CheckCxxRuntime.cmake"
ELF = sys.platform.startswith("linux") and all(shutil.which(t) for t in ("readelf", "nm"))
needs_elf = pytest.mark.skipif(not ELF, reason="reads the ELF dynamic section (readelf, nm)")
needs_tools = pytest.mark.skipif(not (ELF and CMAKE and CXX), reason="needs cmake, g++, binutils")

# Op errors whose messages carry numbers (formatted through the C++ runtime's locale), each
# with the text its message must keep. The first is the probe from the issue.
OP_ERRORS = {
    "ortho_penalty(torch.randn(5, 4), 2)":
        "A.size(0) = 5 must be divisible by num_experts = 2",
    "dropout_mask(torch.zeros(2, dtype=torch.long), [3, 4], 1.5, torch.float32)":
        "dropout_p must be in [0, 1), got 1.5",
    "ortho_penalty(torch.randn(3, 4, 2), 1)":
        "A must be 2-D [r_tot, in], got shape [3, 4, 2]",
    "lowrank_forward(torch.randn(6, 4), torch.randn(2, 5), torch.randn(3, 2), torch.ones(1), "
    "None, None, 0.0, False)":
        "A must be [r, in] with in = x.size(1) = 4, got A of shape [2, 5]",
}
PROBE = "\n".join([
    "import torch, soslora_ext",
    "for call in %r:" % list(OP_ERRORS),
    "    try:",
    "        eval('torch.ops.soslora.' + call)",
    "        print('no error:', call)",
    "    except RuntimeError as e:",
    "        print('raised:', str(e).splitlines()[0])",
])


def run_probe(env=None):
    """The op errors in a fresh process (the whole path: thrown in C++, through the module's
    frames, to Python); returns its result."""
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          timeout=300, env=env, cwd="/tmp")


def assert_clean_errors(result):
    assert result.returncode == 0, (
        f"the process died (rc {result.returncode}; -6 is an abort):\n{result.stderr[-2000:]}")
    raised = [line for line in result.stdout.splitlines() if line.startswith("raised:")]
    assert len(raised) == len(OP_ERRORS), result.stdout
    for line, expected in zip(raised, OP_ERRORS.values()):
        assert expected in line, f"the message lost its numbers: {line!r}, wanted {expected!r}"


def runtime_violations(module) -> list[str]:
    """The rule, read with readelf and nm (independently of cmake/CheckCxxRuntime.cmake)."""
    def tool(*args):
        return subprocess.run([*args, str(module)], capture_output=True, text=True,
                              check=True).stdout
    needed = re.findall(r"\(NEEDED\).*\[(.+)\]", tool("readelf", "-d", "-W"))
    problems = [f"NEEDED lacks {lib}" for lib in ("libstdc++.so.6", "libgcc_s.so.1")
                if lib not in needed]
    defined = [line.split()[-1].split("@")[0]
               for line in tool("nm", "-D", "--defined-only").splitlines() if line.strip()]
    own = [name for name in defined if re.match(r"__cxa_|__gxx_personality_|_Unwind_", name)]
    if own:
        problems.append(f"defines {len(own)} C++ runtime symbols: {own[:5]}")
    undefined = [line.split()[-1].split("@")[0]
                 for line in tool("nm", "-D", "--undefined-only").splitlines() if line.strip()]
    if "_Unwind_Resume" not in undefined:
        problems.append("does not import _Unwind_Resume")
    return problems


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_cpu_kernel(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"soslora::{op}", "CPU")


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_cuda_kernel_in_every_build(op):
    """Without the CUDA kernels (no nvcc at build time) CUDA tensors get the ATen paths."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"soslora::{op}", "CUDA")


@pytest.mark.skipif(not (torch.version.cuda and NVCC.exists()),
                    reason="needs a CUDA build of torch and nvcc")
def test_cuda_kernels_compiled_when_nvcc_is_present():
    assert sl.built_with_cuda


def test_import_needs_no_gpu():
    assert isinstance(sl.built_with_cuda, bool) and sl.__version__


@needs_elf
def test_installed_module_links_the_shared_cxx_runtime():
    """The module this suite runs against keeps the rule."""
    assert runtime_violations(sl._C.__file__) == []


@needs_tools
def test_installed_module_passes_the_build_check(tmp_path):
    copy = tmp_path / Path(sl._C.__file__).name  # the check deletes a module it refuses
    shutil.copy(sl._C.__file__, copy)
    result = subprocess.run([CMAKE, f"-DMODULE={copy}", "-P", str(CHECK)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "links libstdc++.so.6 and libgcc_s.so.1" in result.stdout


def test_op_errors_raise_in_a_fresh_process():
    assert_clean_errors(run_probe())


# A small C++ object with what makes a module depend on the runtime: a throw, a catch and a
# cleanup (the destructor of `s` on the exception path calls _Unwind_Resume).
SMALL_MODULE = """
#include <stdexcept>
#include <string>
extern "C" int probe(int n) {
  try {
    std::string s = std::to_string(n);
    if (n < 0) throw std::runtime_error("n = " + s);
    return static_cast<int>(s.size());
  } catch (const std::exception&) {
    return -1;
  }
}
"""


@needs_tools
@pytest.mark.parametrize("flags, reasons", [
    ([], []),
    (["-static-libstdc++"], ["NEEDED lacks libstdc++.so.6", "C++ runtime symbols"]),
    (["-static-libgcc"], ["NEEDED lacks libgcc_s.so.1", "does not import _Unwind_Resume"]),
], ids=["shared", "static-libstdc++", "static-libgcc"])
def test_check_refuses_a_private_runtime(tmp_path, flags, reasons):
    """cmake/CheckCxxRuntime.cmake (what the build runs after linking) on small objects."""
    (tmp_path / "m.cpp").write_text(SMALL_MODULE)
    module = tmp_path / "m.so"
    subprocess.run([CXX, "-shared", "-fPIC", "-O1", *flags, str(tmp_path / "m.cpp"), "-o",
                    str(module)], check=True, capture_output=True, timeout=120)
    assert bool(runtime_violations(module)) == bool(reasons)
    result = subprocess.run([CMAKE, f"-DMODULE={module}", "-P", str(CHECK)], capture_output=True,
                            text=True, timeout=60)
    message = " ".join(result.stderr.split())  # cmake wraps its messages
    if not reasons:
        assert result.returncode == 0 and module.exists(), result.stderr
        return
    assert result.returncode != 0 and not module.exists()
    assert "refusing" in message, message
    for reason in reasons:
        assert reason in message, message


@needs_tools
def test_static_flags_are_removed_from_every_flag_variable(tmp_path):
    """The flags that embed the runtime go, in every spelling; other flags stay as they were."""
    script = tmp_path / "strip.cmake"
    values = {
        "CMAKE_CXX_FLAGS": "-O2 -static-libstdc++ -flto=auto -static -DX=\"a b\"",
        "CMAKE_MODULE_LINKER_FLAGS": "-static-libgcc -Wl,-static -Wl,--as-needed",
        "CMAKE_CUDA_FLAGS": "-Xcompiler=-static-libgcc -Xcompiler -static -lineinfo",
        "CMAKE_SHARED_LINKER_FLAGS": "-static-pie -static-libasan --static",
        "CMAKE_C_FLAGS": "-O3",
    }
    lines = [f'include("{ROOT}/cmake/SosloraCxxRuntime.cmake")']
    lines += [f"set({name} [=[{value}]=])" for name, value in values.items()]
    lines.append(f"soslora_strip_static_runtime_flags({' '.join(values)})")
    lines += [f'message(NOTICE "{name}=[${{{name}}}]")' for name in values]
    script.write_text("\n".join(lines) + "\n")
    result = subprocess.run([CMAKE, "-P", str(script)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert 'CMAKE_CXX_FLAGS=[-O2 -flto=auto -DX="a b"]' in result.stderr
    assert "CMAKE_MODULE_LINKER_FLAGS=[-Wl,--as-needed]" in result.stderr
    assert "CMAKE_CUDA_FLAGS=[-lineinfo]" in result.stderr
    assert "CMAKE_SHARED_LINKER_FLAGS=[-static-libasan]" in result.stderr
    assert "CMAKE_C_FLAGS=[-O3]" in result.stderr
    warnings = " ".join(result.stderr.split())
    for removed in ["-static-libstdc++", "-Xcompiler=-static-libgcc", "-Xcompiler -static",
                    "-Wl,-static", "-static-pie", "--static"]:
        assert removed in warnings
    assert warnings.count("soslora_ext: removed") == 4  # one warning per changed variable


def configure_and_build(source, build, env, *args):
    generator = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={NINJA}"] if NINJA else []
    configure = subprocess.run([CMAKE, "-S", str(source), "-B", str(build), *generator, *args],
                               capture_output=True, text=True, timeout=300, env=env)
    assert configure.returncode == 0, configure.stdout[-2000:] + configure.stderr[-2000:]
    return subprocess.run([CMAKE, "--build", str(build)], capture_output=True, text=True,
                          timeout=300, env=env)


@needs_tools
def test_post_build_check_fails_the_build(tmp_path):
    """The CMake wiring on a small module: the environment's -static-libstdc++ is removed and
    the module builds; -static-libgcc given to the target itself gets past that, and the check
    after the link fails the build and deletes the module."""
    (tmp_path / "m.cpp").write_text(SMALL_MODULE)
    (tmp_path / "CMakeLists.txt").write_text(f"""
cmake_minimum_required(VERSION 3.26)
project(probe LANGUAGES CXX)
list(APPEND CMAKE_MODULE_PATH "{ROOT}/cmake")
include(SosloraCxxRuntime)
soslora_use_shared_cxx_runtime()
add_library(probe MODULE m.cpp)
set_target_properties(probe PROPERTIES PREFIX "" SUFFIX ".so")
target_link_options(probe PRIVATE ${{EXTRA}})
soslora_check_cxx_runtime(probe)
""")
    env = {**os.environ, "LDFLAGS": "-static-libstdc++", "CXXFLAGS": "-static-libstdc++"}
    good = configure_and_build(tmp_path, tmp_path / "good", env)
    assert good.returncode == 0, good.stdout[-3000:]
    assert runtime_violations(tmp_path / "good" / "probe.so") == []
    bad = configure_and_build(tmp_path, tmp_path / "bad", env, "-DEXTRA=-static-libgcc")
    output = " ".join((bad.stdout + bad.stderr).split())
    assert bad.returncode != 0, output[-3000:]
    assert "refusing" in output and "NEEDED lacks libgcc_s.so.1" in output, output[-3000:]
    assert not (tmp_path / "bad" / "probe.so").exists()


# The package built with flags that used to embed the C++ runtime: once per flag set.
BUILDS = {
    # A private libstdc++ (NEEDED without libstdc++.so.6), with LTO: messages lost numbers.
    "static-libstdc++-lto": {"CXXFLAGS": "-static-libstdc++ -flto=auto",
                             "LDFLAGS": "-static-libstdc++ -flto=auto"},
    # A private unwinder under the system's: every op error aborted the process.
    "static-libgcc": {"CFLAGS": "-static-libgcc", "CXXFLAGS": "-static-libgcc",
                      "LDFLAGS": "-static-libgcc"},
}


@pytest.fixture(scope="module", params=list(BUILDS))
def built(request, tmp_path_factory):
    """pip-installs the package, CPU-only, into a temporary directory; returns (directory,
    module, build log)."""
    if not ELF:
        pytest.skip("reads the ELF dynamic section (readelf, nm)")
    target = tmp_path_factory.mktemp(request.param)
    env = {**os.environ, **BUILDS[request.param], "SOSLORA_CUDA": "0",
           "CUDA_HOME": os.environ.get("CUDA_HOME", "/usr/local/cuda")}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-v",
         "--disable-pip-version-check", "--target", str(target),
         f"--config-settings=build-dir={target / 'build'}", str(ROOT)],
        capture_output=True, text=True, timeout=1800, env=env)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    modules = list((target / "soslora_ext").glob("_C*.so"))
    assert len(modules) == 1, modules
    return target, modules[0], log


@pytest.mark.slow
def test_built_module_links_the_shared_cxx_runtime(built):
    _, module, log = built
    problems = runtime_violations(module)
    assert not problems, f"{module}: {problems}"
    flat = " ".join(log.split())
    assert "soslora_ext: removed `" in flat, "the build did not say which flags it removed"
    assert "links libstdc++.so.6 and libgcc_s.so.1" in flat, "the check did not run"


@pytest.mark.slow
def test_built_module_raises_clean_op_errors(built):
    target, _, _ = built
    assert_clean_errors(run_probe({**os.environ, "PYTHONPATH": str(target)}))


@pytest.mark.skipif(not ELF, reason="reads the ELF dynamic section (readelf, nm)")
def test_gpu_link_probe_runs_on_cpu(tmp_path):
    """bench/gpu_link_probe.sh, for the GPU image, runs here on the installed module: the
    compiler, NEEDED, the bindings of the probe's runtime symbols, the probe."""
    env = {**os.environ, "RESULTS": str(tmp_path), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_link_probe.sh")],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    report = (tmp_path / "link_probe.txt").read_text()
    for section in ["== compiler: c++ -v", "== compiler: specs", "-- NEEDED",
                    "== symbol bindings of the probe", "== probe:", "== result: ok"]:
        assert section in report, section
    assert "gcc version" in report and "*libgcc:" in report
    assert "[libstdc++.so.6]" in report and "[libgcc_s.so.1]" in report
    assert re.search(r"binding file _C\S* .* to libstdc\+\+\.so\.6 .*`__cxa_throw'", report)
    assert "A.size(0) = 5 must be divisible by num_experts = 2" in report
    assert "probe: a clean RuntimeError that keeps its numbers" in report
