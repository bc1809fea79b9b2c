"""The C kernel's build: what its cache key covers, and IEEE semantics for NaN and inf inputs.

The kernel is compiled with -O3 -march=native and the parts of fast-math that keep NaN and inf
(native_build.py says which). A library built for another CPU, compiler or flag set must never be
loaded, and a NaN or inf anywhere in the inputs must give what the float64/float32 reference loop
gives: the same NaN positions, the same infinities, the same finite values.
"""

from __future__ import annotations

import ctypes
import itertools

import pytest
import torch

from vmeanba_compiler.lowering import native_build, scan_cpu
from vmeanba_compiler.lowering.scan_reference import selective_scan_reference
from vmeanba_compiler.testing import ScanInputs, assert_scan_close

SPECIALS = (float("nan"), float("inf"), float("-inf"))


def _inputs(dtype: torch.dtype, state: int, softplus: bool, seed: int = 0) -> ScanInputs:
    g = torch.Generator().manual_seed(seed)
    batch, groups, d, length = 2, 2, 3, 12
    dim = groups * d

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    return ScanInputs(
        rand(batch, dim, length), rand(batch, dim, length), -torch.rand(dim, state, generator=g, dtype=dtype) - 0.5,
        rand(batch, groups, state, length), rand(batch, groups, state, length), rand(dim), z=rand(batch, dim, length),
        delta_bias=rand(dim) * 0.1, delta_softplus=softplus,
    )


def _poisoned(x: ScanInputs, name: str, value: float) -> ScanInputs:
    """x with `value` written into one element of argument `name` (a different row per argument)."""
    tensor = getattr(x, name).clone()
    flat = tensor.view(-1)
    flat[(7 * len(name)) % flat.numel()] = value
    return ScanInputs(**{**{f: getattr(x, f) for f in ScanInputs.__dataclass_fields__}, name: tensor})


def _assert_same_ieee_result(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    nan_a, nan_e = actual.isnan(), expected.isnan()
    assert torch.equal(nan_a, nan_e), f"{what}: NaN at {nan_a.nonzero().tolist()} vs reference {nan_e.nonzero().tolist()}"
    inf_a, inf_e = actual.isinf(), expected.isinf()
    assert torch.equal(inf_a, inf_e), f"{what}: inf at {inf_a.nonzero().tolist()} vs reference {inf_e.nonzero().tolist()}"
    assert torch.equal(actual[inf_a], expected[inf_e]), f"{what}: infinities of another sign"
    finite = ~(nan_e | inf_e)
    assert_scan_close(actual[finite], expected[finite], actual.dtype, what)


@pytest.mark.parametrize("dtype, state, softplus", [
    (torch.float32, 16, True), (torch.float32, 5, False), (torch.float64, 4, True), (torch.float64, 16, False),
])
def test_nan_and_inf_inputs_give_the_reference_result(dtype, state, softplus):
    clean = _inputs(dtype, state, softplus)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    poisoned_anything = False
    for name, value in itertools.product(names, SPECIALS):
        x = _poisoned(clean, name, value)
        y, last = scan_cpu.forward(*x.args())
        y_ref, last_ref = selective_scan_reference(*x.args())
        what = f"{name}={value} ({dtype}, N={state}, softplus={softplus})"
        _assert_same_ieee_result(y, y_ref, f"y with {what}")
        _assert_same_ieee_result(last, last_ref, f"last state with {what}")
        poisoned_anything |= bool((~y_ref.isfinite()).any())
    assert poisoned_anything  # the special values reached the outputs, so the comparison meant something


def test_softplus_keeps_nan_and_maps_infinities_like_torch():
    """softplus(NaN) is NaN (not the threshold: fmin ignores NaN), softplus(-inf) = 0, softplus(inf) = inf:
    with u = 1, B = C = 1, A -> 0 and no skip, y_0 = softplus(delta_0)."""
    for dtype in (torch.float32, torch.float64):
        delta = torch.tensor([[[float("nan"), float("-inf"), float("inf"), 30.0, 0.5]]], dtype=dtype)
        ones = torch.ones(1, 1, 1, 5, dtype=dtype)
        for t in range(5):
            single = (torch.ones(1, 1, 1, dtype=dtype), delta[..., t:t + 1], torch.full((1, 1), -1e-30, dtype=dtype),
                      ones[..., t:t + 1], ones[..., t:t + 1])
            y, _ = scan_cpu.forward(*single, delta_softplus=True)
            expected = torch.nn.functional.softplus(delta[..., t:t + 1])
            _assert_same_ieee_result(y, expected.to(dtype), f"softplus({delta[0, 0, t].item()}) {dtype}")


def test_cache_key_covers_compiler_flags_and_cpu(monkeypatch, tmp_path):
    """Another compiler version, flag set or CPU feature set gives another library file; the same
    ones give the same file (so later processes load the cached build)."""
    monkeypatch.setenv("VMEANBA_CACHE_DIR", str(tmp_path))
    base = native_build.library_path("float")
    assert base == native_build.library_path("float")
    assert base.parent == tmp_path

    monkeypatch.setattr(native_build, "compiler_identity", lambda compiler: f"{compiler}\0gcc 99.1 (other)")
    assert native_build.library_path("float") != base
    monkeypatch.undo()
    monkeypatch.setenv("VMEANBA_CACHE_DIR", str(tmp_path))

    monkeypatch.setattr(native_build, "cpu_identity", lambda: "model name: same\0flags: fpu sse2")
    other_cpu = native_build.library_path("float")
    monkeypatch.setattr(native_build, "cpu_identity", lambda: "model name: same\0flags: fpu sse2 avx512f")
    assert native_build.library_path("float") != other_cpu
    monkeypatch.undo()
    monkeypatch.setenv("VMEANBA_CACHE_DIR", str(tmp_path))

    monkeypatch.setattr(native_build, "_COMPILE_FLAGS", [*native_build._COMPILE_FLAGS, "-funroll-loops"])
    assert native_build.library_path("float") != base
    assert native_build.library_path("double") != native_build.library_path("float")


def test_cpu_identity_includes_the_feature_flags():
    identity = native_build.cpu_identity()
    try:
        cpuinfo = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    flags = next((line for line in cpuinfo.splitlines() if line.startswith(("flags", "Features"))), None)
    if flags is None:
        pytest.skip("/proc/cpuinfo lists no feature flags")
    assert flags.split(":", 1)[1].strip() in identity


@pytest.mark.extended  # a second build of every kernel, without OpenMP
def test_a_compiler_without_openmp_gets_a_single_thread_build(monkeypatch, tmp_path, caplog):
    """The kernels use OpenMP where the C compiler has it; one that refuses -fopenmp (clang without
    libomp) still gets a working library, and the log says why it runs on one thread."""
    real_cc = native_build.c_compiler()
    fake = tmp_path / "cc-without-openmp"
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && {{ echo "no OpenMP" >&2; exit 1; }}; done\n'
                    f'exec {real_cc} "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("VMEANBA_CACHE_DIR", str(tmp_path / "cache"))
    with caplog.at_level("WARNING", logger=native_build.__name__):
        path = native_build._build("float")
    assert path.exists() and "cannot build OpenMP code" in caplog.text and "no OpenMP" in caplog.text
    assert hasattr(ctypes.CDLL(str(path)), "reduced_scan_forward")
