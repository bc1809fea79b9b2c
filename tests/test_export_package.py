"""Deployment: `vmeanba export` writes an AOTInductor package whose scan calls are C functions of the
op library, and the package runs without this project (a fresh Python with only torch) and without
Python (the C++ runner), giving the backend's output.

AOTInductor builds cost 20-60 s each, so one package (the CLI's, of the mini VMamba with one site
rewritten and one full, dynamic batch) is built per module and every check reads it; a second small
package covers the op library's argument forms. The op library and the runner are cached builds
(vmeanba_compiler/deploy).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import vmeanba_compiler as vc
from vmeanba_compiler import cli
from vmeanba_compiler.deploy import op_library, package, runner
from vmeanba_compiler.models.vmamba import build_vmamba

SITE = "stages.0.0.op:0"
PROXY_CALL = "aoti_torch_proxy_executor_call_function"
INPUTS = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(5))  # not the export's batch of 2


def wrapper_source(package_path: Path) -> str:
    with zipfile.ZipFile(package_path) as archive:
        sources = [archive.read(n).decode() for n in archive.namelist() if n.endswith("wrapper.cpp")]
    assert len(sources) == 1, "expected one generated wrapper in the package"
    return sources[0]


def calls(source: str, function: str) -> int:
    """Calls of `function` in generated code (its extern declaration is not a call)."""
    return source.count(f"AOTI_TORCH_ERROR_CODE_CHECK({function}(")


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """`vmeanba export` of a mini VMamba (weights from a checkpoint) with --dynamic-batch --runner. The
    reduced site averages D and z too (skip_mode="mean"), which moves the output far more than the
    tolerance of the comparisons (the negative control of assert_backend_output)."""
    folder = tmp_path_factory.mktemp("deploy")
    torch.manual_seed(0)
    model = build_vmamba("vmamba_mini").eval()
    torch.save(model.state_dict(), folder / "weights.pt")
    (folder / "deploy_model.py").write_text(textwrap.dedent("""
        from vmeanba_compiler.models.vmamba import build_vmamba

        def build():
            return build_vmamba("vmamba_mini")
    """))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.syspath_prepend(str(folder))
        assert cli.main(["export", "--model", "deploy_model:build", "--checkpoint", "weights.pt",
                         "--input-shape", "2,3,32,32", "--dynamic-batch", "--sites", SITE, "--skip-mode", "mean", "--runner",
                         "--out", str(folder / "bundle" / "model.pt2")]) == 0
    compiled = torch.compile(model, backend="vmeanba", options={"sites": [SITE], "skip_mode": "mean", "inductor": False})
    with torch.no_grad():
        expected = compiled(INPUTS)
        plain = model(INPUTS)
    torch._dynamo.reset()
    return folder / "bundle", expected, plain


def assert_backend_output(actual: torch.Tensor, expected: torch.Tensor, plain: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    # negative control: the unrewritten model's output differs by more than that tolerance
    assert not torch.allclose(plain, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.extended
def test_bundle_holds_the_package_the_op_library_and_the_runner(deployed):
    bundle, _, _ = deployed
    assert sorted(p.name for p in bundle.iterdir()) == sorted(["model.pt2", op_library.LIBRARY_FILE, runner.RUNNER_FILE])


@pytest.mark.extended
def test_wrapper_calls_the_op_library_and_never_the_proxy_executor(deployed):
    source = wrapper_source(deployed[0] / "model.pt2")
    assert calls(source, "aoti_torch_cpu_reduced_selective_scan") == 1  # the rewritten site
    assert calls(source, "aoti_torch_cpu_selective_scan") == 1  # the other site, full
    assert PROXY_CALL not in source


@pytest.mark.extended
def test_a_package_without_op_library_calls_uses_the_proxy_executor(tmp_path):
    """Negative control of the check above: AOTInductor's default for a custom op is the proxy call."""
    args = (torch.randn(1, 8, 16), torch.randn(1, 8, 16), -torch.rand(8, 4), torch.randn(1, 2, 4, 16),
            torch.randn(1, 2, 4, 16))
    program = torch.export.export(_FullScan(), args)
    # the generated sources are enough to read the call (package_cpp_only skips compiling them)
    source = wrapper_source(package.package(program, tmp_path / "proxy.pt2", op_library_calls=False,
                                            inductor_configs={"aot_inductor.package_cpp_only": True}))
    assert PROXY_CALL in source and calls(source, "aoti_torch_cpu_selective_scan") == 0


class _FullScan(nn.Module):
    def forward(self, u, delta, A, B, C):
        return vc.selective_scan(u, delta, A, B, C)


_FRESH_PROCESS = """
import sys, torch
try:  # without the op library the package cannot load
    torch._inductor.aoti_load_package(sys.argv[2])
    print("loaded without the op library")
except Exception as error:
    print("refused:", error, file=sys.stderr)
torch.ops.load_library(sys.argv[1])
run = torch._inductor.aoti_load_package(sys.argv[2])
(x,) = torch.load(sys.argv[3])
torch.save(run(x), sys.argv[4])
print(sorted(m for m in sys.modules if m.startswith("vmeanba")))
"""


@pytest.mark.extended
def test_package_runs_in_a_fresh_python_with_only_torch_once_the_op_library_is_loaded(deployed, tmp_path):
    bundle, expected, plain = deployed
    torch.save([INPUTS], tmp_path / "inputs.pt")
    done = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, str(bundle / op_library.LIBRARY_FILE),
                           str(bundle / "model.pt2"), str(tmp_path / "inputs.pt"), str(tmp_path / "outputs.pt")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # negative control: before the library was loaded, loading the package failed naming it
    assert "refused:" in done.stderr and op_library.LIBRARY_FILE in done.stderr
    assert done.stdout.strip() == "[]"  # no module of this project was imported
    assert_backend_output(torch.load(tmp_path / "outputs.pt"), expected, plain)


@pytest.mark.extended
def test_cpp_runner_output_equals_the_backend(deployed):
    bundle, expected, plain = deployed
    (actual,), _ = runner.run(bundle / "model.pt2", [INPUTS], op_library_path=bundle / op_library.LIBRARY_FILE)
    assert_backend_output(actual, expected, plain)


@pytest.mark.extended
def test_cpp_runner_without_the_op_library_fails_naming_it(deployed, tmp_path):
    bundle = deployed[0]
    torch.save([INPUTS], tmp_path / "inputs.pt")
    done = subprocess.run([str(bundle / runner.RUNNER_FILE), str(bundle / "model.pt2"), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "outputs.pt")], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 1 and op_library.LIBRARY_FILE in done.stderr


class _ScanForms(nn.Module):
    """Both ops with every argument form the C functions handle: grouped, shared and fixed B/C, D, z,
    delta_bias, softplus on and off, both reduction modes, float64."""

    def forward(self, u, delta, A, B_grouped, C_shared, B_fixed, C_fixed, D, z, bias):
        scan, reduced = torch.ops.vmeanba.selective_scan, torch.ops.vmeanba.reduced_selective_scan
        return (
            *scan(u, delta, A, B_grouped, C_shared, D, z, bias, True),
            *scan(u, delta, A, B_fixed, C_fixed, None, None, None, False),
            *scan(u.double(), delta.double(), A.double(), B_grouped.double(), C_fixed.double(), D.double()),
            *reduced(u, delta, A, B_grouped, C_shared, D, z, bias, True, groups=4, dt_mode="raw", skip_mode="mean"),
            *reduced(u, delta, A, B_fixed, C_fixed, D, z, bias, True, groups=4, dt_mode="effective",
                     skip_mode="exact"),
        )


@pytest.mark.extended
def test_op_library_functions_equal_the_python_kernels_for_every_form(tmp_path):
    g = torch.Generator().manual_seed(0)
    batch, dim, state, length = 2, 16, 4, 24
    args = (torch.randn(batch, dim, length, generator=g), torch.randn(batch, dim, length, generator=g),
            -torch.rand(dim, state, generator=g), torch.randn(batch, 2, state, length, generator=g),
            torch.randn(batch, state, length, generator=g), torch.randn(dim, state, generator=g),
            torch.randn(dim, state, generator=g), torch.randn(dim, generator=g),
            torch.randn(batch, dim, length, generator=g), torch.randn(dim, generator=g))
    program = torch.export.export(_ScanForms(), args)
    op_library.load()
    run = torch._inductor.aoti_load_package(str(package.package(program, tmp_path / "forms.pt2")))
    actual, expected = run(*args), _ScanForms()(*args)
    assert len(actual) == len(expected) == 10
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, index
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=lambda m: f"output {index}: {m}")


def test_c_declarations_are_generated_from_the_op_schemas():
    declarations = op_library.shim_declarations()
    tensors = "AtenTensorHandle u, AtenTensorHandle delta, AtenTensorHandle A, AtenTensorHandle B, AtenTensorHandle C, " \
              "AtenTensorHandle* D, AtenTensorHandle* z, AtenTensorHandle* delta_bias, int32_t delta_softplus"
    outputs = "AtenTensorHandle* ret0, AtenTensorHandle* ret1"
    assert declarations[torch.ops.vmeanba.selective_scan.default] == [
        f"AOTITorchError aoti_torch_cpu_selective_scan({tensors}, {outputs})"]
    assert declarations[torch.ops.vmeanba.reduced_selective_scan.default] == [
        f"AOTITorchError aoti_torch_cpu_reduced_selective_scan({tensors}, int64_t groups, const char* dt_mode, "
        f"const char* skip_mode, {outputs})"]


@torch.library.custom_op("vmeanba_test_export::scaled", mutates_args=())
def _scaled(x: torch.Tensor, factor: float) -> torch.Tensor:
    return x * factor


def test_a_schema_type_without_a_c_mapping_is_refused_naming_it():
    with pytest.raises(NotImplementedError, match="argument 'factor' has type float"):
        op_library.shim_declaration(torch.ops.vmeanba_test_export.scaled.default)


def test_no_cxx_compiler_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(RuntimeError, match=r"needs a C\+\+ compiler: install g\+\+.*\$CXX"):
        op_library.cxx_compiler()


def test_package_refuses_a_project_op_without_a_c_function(monkeypatch, tmp_path):
    args = (torch.randn(1, 8, 16), torch.randn(1, 8, 16), -torch.rand(8, 4), torch.randn(1, 2, 4, 16),
            torch.randn(1, 2, 4, 16))
    program = torch.export.export(_FullScan(), args)
    monkeypatch.setattr(op_library, "shim_declarations", lambda: {})
    with pytest.raises(NotImplementedError, match="vmeanba.selective_scan.default, which the vmeanba op library has "
                                                  "no C function for"):
        package.package(program, tmp_path / "never.pt2")
    assert not (tmp_path / "never.pt2").exists()


@pytest.mark.extended
def test_op_library_build_is_cached_under_a_content_key():
    first = op_library.build.__wrapped__()  # past this process's lru_cache, as a new process builds
    stamp = first.stat().st_mtime_ns
    again = op_library.build.__wrapped__()
    assert again == first and again.stat().st_mtime_ns == stamp  # found in the cache, not rebuilt
    assert first.name == op_library.LIBRARY_FILE and first.parent.name.startswith("oplib-")


@pytest.mark.extended
def test_a_kernel_whose_signature_drifts_from_the_op_library_does_not_build(tmp_path):
    """The kernels are compiled with kernel_abi.h force-included: a definition that no longer matches
    what the op library calls is a compile error, not a call with the wrong arguments."""
    from vmeanba_compiler.lowering import native_build

    drifted = tmp_path / "drifted.c"
    drifted.write_text("void scan_forward(const float *u, const float *delta) { (void)u; (void)delta; }\n")
    done = subprocess.run([native_build.c_compiler(), *op_library._kernel_flags("float"), "-c", str(drifted), "-o",
                           str(tmp_path / "drifted.o")], capture_output=True, text=True)
    assert done.returncode != 0 and "conflicting types" in done.stderr and "vmeanba_scan_forward_float" in done.stderr
    assert op_library.build().exists()  # control: the real kernels build with the same flags
