"""cap_masked_gemm: JIT build, builder wiring, training masked linear == the PyTorch path, fallbacks, nvcc."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cap_ds.ops as ops
from cap_ds.compression.layers import MaskedLinear
from cap_ds.ops import loader
from cap_ds.ops.masked_linear import masked_linear, masked_linear_reference

masked_linear_mod = importlib.import_module("cap_ds.ops.masked_linear")  # the package attribute is the function

CSRC = Path(ops.__file__).resolve().parent / "csrc"
HAS_CXX = shutil.which("c++") is not None or shutil.which("g++") is not None


@pytest.fixture(scope="module")
def op():
    """The built op, with CAP_DS_KERNELS=on for the rest of this module (auto never takes the training kernel)."""
    if not HAS_CXX:
        pytest.skip("no C++ compiler: the op cannot be built (the PyTorch path is used)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAP_DS_KERNELS", "on")
        module = ops.load_kernels()
        assert module is not None, f"cap_masked_gemm failed to build: {loader._state['error']!r}"
        yield module


@pytest.fixture
def fresh_state(monkeypatch):
    """Run with a forgotten load attempt (a new process's state); the real one is back afterwards."""
    monkeypatch.setattr(loader, "_state", {"tried": False, "module": None, "error": None})
    return monkeypatch


def test_jit_build_cpu(op):
    assert callable(op.csr_linear) and callable(op.masked_linear_forward)
    if not torch.cuda.is_available():
        assert op.with_cuda() is False
    assert ops.kernels_available() and ops.kernels_support("cpu")
    assert ops.load_kernels() is op  # built once, cached


def test_builder_is_deepspeed_style():
    from deepspeed.ops.op_builder.builder import CUDAOpBuilder, OpBuilder

    from cap_ds.ops.builder import CapMaskedGemmBuilder, CapMaskedGemmCPUBuilder

    builder = CapMaskedGemmBuilder()
    assert isinstance(builder, CUDAOpBuilder) and builder.name == "cap_masked_gemm"
    assert builder.absolute_name() == "cap_ds.ops.cap_masked_gemm"
    builder.build_for_cpu = True
    cpu_sources = builder.sources()
    assert cpu_sources and not any(s.endswith(".cu") for s in cpu_sources)
    assert all(Path(s).is_file() for s in cpu_sources)
    assert "-DCAP_WITH_CUDA" not in builder.cxx_args() and builder.nvcc_args() == []
    builder.build_for_cpu = False
    assert any(s.endswith(".cu") for s in builder.sources())
    assert "-DCAP_WITH_CUDA" in builder.cxx_args()
    cpu = CapMaskedGemmCPUBuilder()
    assert isinstance(cpu, OpBuilder) and not isinstance(cpu, CUDAOpBuilder)
    assert not any(s.endswith(".cu") for s in cpu.sources())
    ext = cpu.builder()  # the setup.py (CAP_BUILD_OPS=1) extension
    assert ext.name == "cap_ds.ops.cap_masked_gemm_cpu"


def _case(shape, n_out, dtype, density, bias, noncontig=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = shape[-1]
    x = torch.randn(*shape[:-1], 2 * k if noncontig else k, generator=g).to(dtype)
    if noncontig:
        x = x[..., ::2]
        assert not x.is_contiguous()
    w = torch.randn(n_out, k, generator=g).to(dtype)
    scores = torch.randn(n_out, k, generator=g).to(dtype)
    b = torch.randn(n_out, generator=g).to(dtype) if bias else None
    keep = torch.rand(n_out, k, generator=g) < density
    return x, w, scores, keep, b


def _run(fn, x, w, scores, keep, b, grad_out=None):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    scores = scores.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    # straight-through mask: value 0/1 in the weight dtype, gradient passed to the scores (as movement pruning)
    mask = keep.to(w.dtype) + scores - scores.detach()
    y = fn(x, w, mask, b)
    if grad_out is None:
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.device, y.dtype)
    inputs = [x, w, scores] + ([b] if b is not None else [])
    return (y, *torch.autograd.grad(y, inputs, grad_out)), grad_out


@pytest.mark.parametrize("shape,n_out", [((9, 33), 17), ((3, 5, 64), 48), ((1, 7), 1), ((1, 1, 31), 29)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("bias", [True, False])
def test_masked_linear_matches_pytorch_fp32(op, shape, n_out, density, bias):
    case = _case(shape, n_out, torch.float32, density, bias)
    ours, g = _run(masked_linear, *case)
    ref, _ = _run(masked_linear_reference, *case, grad_out=g)
    assert ours[0].grad_fn.name().startswith("MaskedLinearFunction")
    for a, r in zip(ours, ref):  # forward, dx, dW, dscores (= dM), db
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("noncontig", [False, True])
def test_masked_linear_large_is_identical(op, noncontig):
    """Same ATen GEMMs as autograd's linear: on a BERT-sized layer the results are bit-identical."""
    case = _case((4, 64, 384), 1536, torch.float32, 0.1, True, noncontig=noncontig)
    ours, g = _run(masked_linear, *case)
    ref, _ = _run(masked_linear_reference, *case, grad_out=g)
    for a, r in zip(ours, ref):
        assert torch.equal(a, r)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_masked_linear_matches_pytorch_low_precision(op, dtype):
    case = _case((4, 6, 40), 24, dtype, 0.5, True, seed=3)
    ours, g = _run(masked_linear, *case)
    ref, _ = _run(masked_linear_reference, *case, grad_out=g)
    for a, r in zip(ours, ref):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), r.float(), rtol=2e-2, atol=2e-2)


def test_masked_linear_partial_gradients(op):
    """Magnitude masks carry no gradient, frozen weights none either: only the wanted gradients are built."""
    x, w, scores, keep, b = _case((8, 16), 12, torch.float32, 0.5, True)
    mask = keep.float()
    x.requires_grad_()
    y = masked_linear(x, w, mask, b)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(8, 12) @ (w * mask))
    w.requires_grad_()
    y = masked_linear(x.detach(), w, mask, None)
    (dw,) = torch.autograd.grad(y.sum(), (w,))
    torch.testing.assert_close(dw, (torch.ones(8, 12).t() @ x.detach()) * mask)


def test_masked_linear_falls_back_for_unsupported(op):
    x, w, scores, keep, b = _case((4, 8), 5, torch.float64, 0.5, True)
    y = masked_linear(x, w, keep.double(), b)  # float64: no kernel, same expression
    torch.testing.assert_close(y, F.linear(x, w * keep.double(), b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xf, wf = x.float().requires_grad_(), w.float().requires_grad_()
        y = masked_linear(xf, wf, keep.float(), b.float())
        assert y.grad_fn is None or not y.grad_fn.name().startswith("MaskedLinearFunction")


@pytest.mark.parametrize("method", ["movement", "magnitude", "soft_movement"])
def test_masked_linear_module_uses_kernel_with_same_numbers(op, kernel_switch, method):
    torch.manual_seed(0)
    layer = MaskedLinear(48, 40, method=method, mask_init="uniform", mask_scale=1.0)
    layer.threshold = 0.3 if method != "soft_movement" else 0.5
    x = torch.randn(2, 5, 48)
    results = []
    for use in (True, False):
        kernel_switch("on" if use else "off")
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y = layer(xi)
        assert y.grad_fn.name().startswith("MaskedLinearFunction") == use
        (y * torch.arange(40.0)).sum().backward()
        grads = [xi.grad, layer.weight.grad, layer.bias.grad]
        if layer.mask_scores is not None:
            grads.append(layer.mask_scores.grad)
        results.append([y.detach(), *grads])
    for a, r in zip(*results):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)


def test_kernel_switch_values(kernel_switch, monkeypatch):
    assert ops.kernel_mode() == "auto"
    for value, mode in (("on", "on"), (" OFF ", "off"), ("auto", "auto"), ("", "auto"), ("1", "auto"),
                        ("0", "off"), ("false", "off")):
        kernel_switch(value)
        assert ops.kernel_mode() == mode and ops.kernels_enabled() == (mode != "off")
    kernel_switch("fast")
    with pytest.raises(ValueError, match=r"CAP_DS_KERNELS='fast'.*allowed: auto, on, off"):
        ops.kernel_mode()
    kernel_switch("auto")
    monkeypatch.setenv("CAP_DS_MASKED_KERNEL", "on")  # the retired switch: said, not obeyed
    with pytest.warns(FutureWarning, match="CAP_DS_MASKED_KERNEL is no longer read"):
        assert ops.kernel_mode() == "auto"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_routes_to_the_expression(kernel_switch, monkeypatch, device, dtype):
    """Routing only (no tensors on the device): auto never takes the training kernel (H200: 6x / 2.6x slower in
    bf16; CPU: slower or no measurable win), so auto never builds it either; on takes it, off never."""
    calls = []
    monkeypatch.setattr(loader, "kernels_support", lambda dev: calls.append(dev) or True)
    monkeypatch.setattr(masked_linear_mod, "_kernel_usable", lambda *a: True)
    x = w = m = torch.zeros(1, 1, dtype=dtype)
    assert not masked_linear_mod.use_kernel(x, w, m) and calls == []
    kernel_switch("on")
    assert masked_linear_mod.use_kernel(x, w, m) and calls == [x.device]
    kernel_switch("off")
    assert not masked_linear_mod.use_kernel(x, w, m)


@pytest.mark.parametrize("mode", ["auto", "on", "off"])
def test_masked_linear_numbers_equal_the_expression_in_every_mode(op, kernel_switch, mode):
    case = _case((4, 64, 96), 80, torch.float32, 0.1, True, seed=5)
    ref, g = _run(masked_linear_reference, *case)
    kernel_switch(mode)
    ours, _ = _run(masked_linear, *case, grad_out=g)
    assert ours[0].grad_fn.name().startswith("MaskedLinearFunction") == (mode == "on")
    for a, r in zip(ours, ref):
        assert torch.equal(a, r)


def test_masked_linear_module_structured_masks_keep_pytorch_path(op):
    layer = MaskedLinear(32, 16, method="magnitude")
    layer.threshold = 0.5
    layer.enable_row_pruning("l1")
    y = layer(torch.randn(3, 32, requires_grad=True))
    assert not y.grad_fn.name().startswith("MaskedLinearFunction")


def test_env_switch_disables_kernels(fresh_state):
    fresh_state.setenv("CAP_DS_KERNELS", "off")
    assert not ops.kernels_enabled() and ops.load_kernels() is None and not loader._state["tried"]
    x, w, scores, keep, b = _case((4, 8), 5, torch.float32, 0.5, True)
    y = masked_linear(x.requires_grad_(), w, keep.float(), b)
    assert not y.grad_fn.name().startswith("MaskedLinearFunction")


def test_build_failure_warns_once_and_falls_back(fresh_state):
    from cap_ds.ops import builder

    def broken(self, verbose=False):
        raise RuntimeError("Error building extension 'cap_masked_gemm': c++: command not found")

    fresh_state.setattr(builder.CapMaskedGemmBuilder, "load", broken)
    fresh_state.setattr(builder.CapMaskedGemmCPUBuilder, "load", broken)
    with pytest.warns(RuntimeWarning, match="pure-PyTorch path"):
        assert ops.load_kernels() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.load_kernels() is None  # no second warning, no retry
        x, w, scores, keep, b = _case((4, 8), 5, torch.float32, 0.5, True)
        torch.testing.assert_close(masked_linear(x, w, keep.float(), b), F.linear(x, w * keep.float(), b))


# ---------------------------------------------------------------- builds that were interrupted or are running
LOAD = ("import logging, sys\nlogging.basicConfig(level=logging.INFO)\nfrom cap_ds import ops\n"
        "m = ops.load_kernels()\nprint('LOADED' if m is not None else 'FALLBACK', m and m.__file__)\n")


def _build_copy(tmp_path: Path) -> tuple[Path, dict]:
    """This checkout's built op copied (mtimes kept: ninja has nothing to do) into a private extensions root."""
    from cap_ds.ops.builder import CapMaskedGemmBuilder

    src = CapMaskedGemmBuilder().jit_plan()[3]
    dst = tmp_path / "ext" / src.name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("lock", "cap_build.lock"))
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    return dst, env


def test_interrupted_build_lock_does_not_hang_later_runs(op, tmp_path):
    """A build killed mid-way leaves torch's `lock`; the next process removes it, announces and finishes the build."""
    folder, env = _build_copy(tmp_path)
    (folder / "lock").touch()  # no process holds the build turn: what a killed build leaves
    (folder / "cap_masked_gemm.so").unlink()  # the link step was interrupted too
    proc = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0 and "LOADED" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert str(folder) in proc.stdout  # loaded from the private root, not the shared cache
    assert f"removing {folder / 'lock'}, left by an interrupted build" in proc.stderr
    assert "building cap_masked_gemm (first use, ~1 min" in proc.stderr
    assert not (folder / "lock").exists()


def test_wait_for_a_live_builder_is_bounded(op, tmp_path):
    """While another process holds the build turn, a loader waits at most CAP_DS_KERNELS_BUILD_TIMEOUT seconds,
    then uses the PyTorch path with the op's one warning."""
    import fcntl

    folder, env = _build_copy(tmp_path)
    with open(folder / "cap_build.lock", "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        holder.write('{"pid": 1, "host": "elsewhere", "since": "earlier"}')
        holder.flush()
        proc = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True, timeout=600,
                              env={**env, "CAP_DS_KERNELS_BUILD_TIMEOUT": "2"})
    assert proc.returncode == 0 and "FALLBACK" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "waiting for another process building it" in proc.stderr and "pid 1 on elsewhere" in proc.stderr
    assert "TimeoutError" in proc.stderr and "pure-PyTorch path" in proc.stderr


def test_each_checkout_and_version_builds_in_its_own_folder(tmp_path, monkeypatch):
    from cap_ds.ops import builder

    def folder() -> str:
        return builder.CapMaskedGemmBuilder().jit_plan()[3].name

    here = folder()
    assert here.startswith("cap_masked_gemm-")
    other = tmp_path / "other_checkout" / "csrc"
    shutil.copytree(CSRC, other)
    monkeypatch.setattr(builder, "CSRC", other)
    assert folder() != here  # same sources, another checkout
    moved = folder()
    (other / "cap_ops.cpp").write_text((other / "cap_ops.cpp").read_text() + "\n// changed\n")
    assert folder() not in (here, moved)  # another version of the sources


NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("source", ["masked_linear_cuda.cu", "spmm_cuda.cu", "cuda_host.cpp"])
def test_cuda_sources_compile_with_nvcc(tmp_path, source):
    """`nvcc -c` with torch's include dirs (no GPU needed). The .cu files need only the CUDA toolkit;
    cuda_host.cpp is the torch-facing adapter."""
    from torch.utils.cpp_extension import include_paths

    torch_inc = Path(include_paths()[0])
    cmd = [NVCC, "-c", str(CSRC / source), "-o", str(tmp_path / (source + ".o")), "-std=c++20", "-DCAP_WITH_CUDA",
           "-I", str(CSRC), "-I", sysconfig.get_paths()["include"], "-Xcompiler", "-fPIC",
           "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    for inc in include_paths():
        cmd += ["-I", inc]
    if not (torch_inc / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file():
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")  # CPU wheels ship c10/cuda without its generated header
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / (source + ".o")).stat().st_size > 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_linear_cuda_matches_pytorch(dtype, cuda_kernels, kernel_switch):
    case = [t.cuda() if t is not None else None for t in _case((4, 33, 96), 80, dtype, 0.3, True)]
    kernel_switch("on")  # the kernel itself (auto routes CUDA to the expression)
    ours, g = _run(masked_linear, *case)
    ref, _ = _run(masked_linear_reference, *case, grad_out=g)
    assert ours[0].grad_fn.name().startswith("MaskedLinearFunction")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a.float(), r.float(), rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_routes_cuda_to_the_expression(dtype, kernel_switch):
    """On a real CUDA tensor, auto (the default) takes F.linear(x, W*M): same numbers as the expression, bit for bit;
    off too; on takes the kernel where the op was built with CUDA."""
    case = [t.cuda() if t is not None else None for t in _case((8, 64, 96), 128, dtype, 0.1, True, seed=2)]
    ref, g = _run(masked_linear_reference, *case)
    for mode in ("auto", "off"):
        kernel_switch(mode)
        assert not masked_linear_mod.use_kernel(case[0], case[1], case[3].to(dtype), case[4])
        ours, _ = _run(masked_linear, *case, grad_out=g)
        assert not ours[0].grad_fn.name().startswith("MaskedLinearFunction")
        for a, r in zip(ours, ref):
            assert torch.equal(a, r)
    kernel_switch("on")
    assert masked_linear_mod.use_kernel(case[0], case[1], case[3].to(dtype), case[4]) == ops.kernels_support("cuda")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


# ---------------------------------------------------------------- issue 22: W*M not kept for the backward
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("learned", [True, False])
def test_recomputed_masked_linear_matches_the_expression_and_keeps_no_masked_copy(dtype, learned):
    from cap_ds.compression.methods import CachedBinarizer
    from cap_ds.ops import recomputed_masked_linear

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 5, 48, generator=g).to(dtype)
    w0 = torch.randn(40, 48, generator=g).to(dtype)
    b0 = torch.randn(40, generator=g).to(dtype)
    s0 = torch.randn(40, 48, generator=g).to(dtype)
    keep = torch.rand(40, 48, generator=g) > 0.7
    grad_out = torch.randn(3, 5, 40, generator=g).to(dtype)

    def leaves():
        return [t.clone().requires_grad_(True) for t in (x0, w0, b0, s0)]

    x, w, b, s = leaves()
    mask = CachedBinarizer.apply(s, keep.to(dtype)) if learned else keep.to(dtype)
    ref = F.linear(x, w * mask, b)
    ref.backward(grad_out)

    x2, w2, b2, s2 = leaves()
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = recomputed_masked_linear(x2, w2, b2, keep, s2 if learned else None)
    out.backward(grad_out)
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    assert torch.equal(out, ref)
    for got, want in ((x2.grad, x.grad), (w2.grad, w.grad), (b2.grad, b.grad)):
        torch.testing.assert_close(got, want, **tol)
    if learned:
        torch.testing.assert_close(s2.grad, s.grad, **tol)
    else:
        assert s2.grad is None
    # Kept for the backward: the input, the weight itself and the boolean mask; no full-size copy in the weight's
    # dtype (the expression keeps W*M and the mask cast to the weight's dtype).
    assert {t.data_ptr() for t in saved} == {x2.data_ptr(), w2.data_ptr(), keep.data_ptr()}
