"""Bad input at every public entry point, as one table: each row is run and its error (type and
message) asserted, and docs/BAD_INPUTS.md is generated from the same rows, so the table there
shows exactly the errors users get. Rows marked "accepted" are inputs that look wrong but are
handled; their check asserts the handling.

Regenerate the doc after changing a row or a message: VMEANBA_UPDATE_DOCS=1 python -m pytest tests/test_bad_inputs.py
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
from doc_sections import DOCS, check_generated_section

import vmeanba_compiler as vc
from vmeanba_compiler.config import VMeanbaConfig
from vmeanba_compiler.models import SS2D, build_vmamba
from vmeanba_compiler.profile import SiteSignature, SiteStats


@dataclass(frozen=True)
class Case:
    entry: str  # the public entry point
    bad_input: str  # what is wrong, in words
    call: Callable[[Path], Any]  # gets a fresh directory; raises, or asserts the handling
    error: Optional[type[BaseException]]  # None: accepted
    match: str  # regex the message must match; for accepted rows, what happens

    @property
    def id(self) -> str:
        return re.sub(r"\W+", "_", f"{self.entry} {self.bad_input}").strip("_").lower()


# --- inputs ------------------------------------------------------------------------------------

def _scan(**changes: Any) -> dict[str, Any]:
    """Valid arguments (batch 2, dim 4 in 2 groups, N 3, L 6), then `changes`."""
    gen = torch.Generator().manual_seed(0)
    args = dict(u=torch.randn(2, 4, 6, generator=gen), delta=torch.rand(2, 4, 6, generator=gen),
                A=-torch.rand(4, 3, generator=gen) - 0.5, B=torch.randn(2, 2, 3, 6, generator=gen),
                C=torch.randn(2, 2, 3, 6, generator=gen), D=torch.randn(4, generator=gen),
                z=torch.randn(2, 4, 6, generator=gen), delta_bias=torch.randn(4, generator=gen))
    return {**args, **{k: (v(args) if callable(v) else v) for k, v in changes.items()}}


def _non_contiguous_inputs_match_contiguous(_: Path) -> None:
    layouts = _scan(u=lambda a: a["u"].transpose(1, 2).contiguous().transpose(1, 2),
                    B=lambda a: a["B"][:1].expand(2, -1, -1, -1), C=lambda a: a["C"].transpose(2, 3).contiguous().transpose(2, 3))
    assert not layouts["u"].is_contiguous() and not layouts["B"].is_contiguous()
    dense = {k: v.contiguous() for k, v in layouts.items()}
    assert torch.equal(vc.selective_scan(**layouts), vc.selective_scan(**dense))


def _empty_sequence_gives_empty_output(_: Path) -> None:
    y, last_state = vc.selective_scan(**_scan(u=torch.zeros(2, 4, 0), delta=torch.zeros(2, 4, 0),
                                              B=torch.zeros(2, 2, 3, 0), C=torch.zeros(2, 2, 3, 0),
                                              z=torch.zeros(2, 4, 0)), return_last_state=True)
    assert y.shape == (2, 4, 0) and torch.equal(last_state, torch.zeros(2, 4, 3))


def _reduced(groups: Any = 2, **changes: Any) -> Callable[[Path], Any]:
    """The reduced-site op on `_scan(**changes)` (B in 2 groups, so groups may be 2 or 4)."""
    return lambda d: torch.ops.vmeanba.reduced_selective_scan(**_scan(**changes), groups=groups)


def _reduced_non_contiguous_inputs_match_contiguous(_: Path) -> None:
    layouts = _scan(u=lambda a: a["u"].transpose(1, 2).contiguous().transpose(1, 2),
                    B=lambda a: a["B"][:1].expand(2, -1, -1, -1), C=lambda a: a["C"].transpose(2, 3).contiguous().transpose(2, 3))
    assert not layouts["u"].is_contiguous() and not layouts["B"].is_contiguous()
    dense = {k: v.contiguous() for k, v in layouts.items()}
    actual, expected = (torch.ops.vmeanba.reduced_selective_scan(**args, groups=2) for args in (layouts, dense))
    assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])


def _reduced_empty_sequence_gives_empty_output(_: Path) -> None:
    y, last_state = torch.ops.vmeanba.reduced_selective_scan(
        **_scan(u=torch.zeros(2, 4, 0), delta=torch.zeros(2, 4, 0), B=torch.zeros(2, 2, 3, 0), C=torch.zeros(2, 2, 3, 0),
                z=torch.zeros(2, 4, 0)), groups=2)
    assert y.shape == (2, 4, 0) and torch.equal(last_state, torch.zeros(2, 4, 3))


@functools.cache
def _model() -> torch.nn.Module:
    """One-site vmamba (site "stages.0.0.op:0"), built once."""
    torch.manual_seed(0)
    return build_vmamba("vmamba_mini", depths=(1,)).eval()


IMAGES = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))

_SIG = SiteSignature(dim=128, state=4, groups=4, b_form="grouped", c_form="grouped", has_D=True, has_z=False)


def _profile(sites: int = 1, **signature: Any) -> vc.Profile:
    ids = [f"stages.{i}.0.op:0" for i in range(sites)]
    sig = SiteSignature(**{**_SIG.to_dict(), **signature})
    stats = SiteStats()
    stats.channel_variance.update(torch.tensor([0.1]))
    stats.mean_square.update(torch.tensor([1.0]))
    return vc.Profile({i: sig for i in ids}, "ab" * 32, {i: stats for i in ids}, num_batches=1, num_samples=2)


def _profile_file(directory: Path, edit: Optional[Callable[[dict], Any]] = None, raw: Optional[bytes] = None) -> str:
    path = directory / "profile.json"
    data = _profile().to_dict()
    if edit is not None:
        edit(data)
    path.write_bytes(raw if raw is not None else json.dumps(data).encode())
    return str(path)


def _truncated_profile_file(directory: Path) -> str:
    path = _profile().save(directory / "profile.json")
    path.write_bytes(path.read_bytes()[:100])
    return str(path)


_KILLED_MID_SAVE = textwrap.dedent("""
    import json, os, signal, sys
    import vmeanba_compiler as vc
    profile = vc.Profile.load(sys.argv[1])
    profile.num_batches += 1
    def dump_half_then_die(obj, fp, **kwargs):
        text = json.dumps(obj, **kwargs)
        fp.write(text[: len(text) // 2])
        fp.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup runs, as after a crash or a power cut
    json.dump = dump_half_then_die
    profile.save(sys.argv[1])
""")


def _process_killed_while_saving_leaves_the_old_file(directory: Path) -> None:
    path = _profile().save(directory / "profile.json")
    before = path.read_bytes()
    done = subprocess.run([sys.executable, "-c", _KILLED_MID_SAVE, str(path)], capture_output=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert path.read_bytes() == before and vc.Profile.load(path).num_batches == 1
    leftovers = [p.name for p in directory.iterdir() if p != path]
    assert leftovers and all(n.startswith(".profile.json.") and n.endswith(".tmp") for n in leftovers), leftovers



def _poisoned(_: Path) -> list[torch.Tensor]:
    images = IMAGES.clone()
    images[0, 0, 0, 0] = float("nan")
    return [IMAGES, images]


def _calibrate(**kwargs: Any) -> Callable[[Path], Any]:
    return lambda d: vc.calibrate(**{"model": _model(), "batches": [IMAGES], "progress": False, **kwargs})


def _options(**options: Any) -> Callable[[Path], Any]:
    return lambda d: VMeanbaConfig.from_options(options)


def _compile(images: torch.Tensor = IMAGES, **kwargs: Any) -> Callable[[Path], Any]:
    def call(_: Path) -> Any:
        torch._dynamo.reset()
        try:
            with torch.no_grad():
                return torch.compile(_model(), backend="vmeanba", **kwargs)(images)
        finally:
            torch._dynamo.reset()

    return call


def _explain(**options: Any) -> Callable[[Path], Any]:
    return lambda d: vc.explain(_model(), IMAGES, **options)


def _export(args: Any = (IMAGES,), **options: Any) -> Callable[[Path], Any]:
    return lambda d: vc.export(_model(), args, **options)


def _without_cxx(directory: Path) -> Any:
    from vmeanba_compiler.deploy import op_library

    with pytest.MonkeyPatch.context() as patch:  # a PATH with no compiler on it, no $CXX
        patch.setenv("PATH", str(directory))
        patch.delenv("CXX", raising=False)
        return op_library.cxx_compiler()


class _ScanOnly(torch.nn.Module):
    def forward(self, u, delta, A, B, C):
        return vc.selective_scan(u, delta, A, B, C)


def _package_meta_program(directory: Path) -> Any:
    from vmeanba_compiler.deploy import package

    args = [torch.randn(*s, device="meta") for s in ((1, 8, 6), (1, 8, 6), (8, 4), (1, 2, 4, 6), (1, 2, 4, 6))]
    return package.package(torch.export.export(_ScanOnly(), tuple(args)), directory / "model.pt2")


OP, CAL, LOAD, OPT = "selective_scan", "calibrate", "Profile.load", "torch.compile(options=...)"
REDUCED = "vmeanba::reduced_selective_scan"
COMPILE = 'torch.compile(backend="vmeanba")'
CASES = [
    Case(OP, "u of rank 2", lambda d: vc.selective_scan(**_scan(u=lambda a: a["u"][0])), ValueError,
         r"'u' has shape \(4, 6\) but expected \(batch, dim, L\)"),
    Case(OP, "delta's shape differs from u's", lambda d: vc.selective_scan(**_scan(delta=lambda a: a["delta"][..., :5])),
         ValueError, r"'delta' has shape \(2, 4, 5\) but expected \(batch=2, dim=4, L=6\), the shape of 'u'"),
    Case(OP, "A with the wrong number of rows", lambda d: vc.selective_scan(**_scan(A=lambda a: a["A"][:3])),
         ValueError, r"'A' has shape \(3, 3\) but expected \(dim=4, N\)"),
    Case(OP, "B's groups do not divide dim", lambda d: vc.selective_scan(**_scan(B=torch.zeros(2, 3, 3, 6))),
         ValueError, r"'B' has shape \(2, 3, 3, 6\) but expected \(batch=2, G, N=3, L=6\) with dim=4 divisible by G"),
    Case(OP, "C with the wrong state size", lambda d: vc.selective_scan(**_scan(C=torch.zeros(2, 2, 5, 6))),
         ValueError, r"'C' has shape \(2, 2, 5, 6\) but expected"),
    Case(OP, "D of the wrong length", lambda d: vc.selective_scan(**_scan(D=torch.zeros(3))), ValueError,
         r"'D' has shape \(3,\) but expected \(dim=4,\)"),
    Case(OP, "z's shape differs from u's", lambda d: vc.selective_scan(**_scan(z=lambda a: a["z"][:1])), ValueError,
         r"'z' has shape \(1, 4, 6\) but expected \(batch=2, dim=4, L=6\)"),
    Case(OP, "integer u", lambda d: vc.selective_scan(**_scan(u=torch.ones(2, 4, 6, dtype=torch.int64))), TypeError,
         r"'u' has dtype torch\.int64; expected one of float16, bfloat16, float32, float64 \(cast it with \.float\(\)\)"),
    Case(OP, "delta in another dtype than u (outside autocast)",
         lambda d: vc.selective_scan(**_scan(delta=lambda a: a["delta"].half())), TypeError,
         r"'delta' has dtype torch\.float16 but 'u' has torch\.float32; pass both in one dtype"),
    Case(OP, "an argument on another device", lambda d: vc.selective_scan(**_scan(A=lambda a: a["A"].to("meta"))),
         RuntimeError, r"'A' is on meta but 'u' is on cpu; move all arguments to one device"),
    Case(OP, "u not a tensor", lambda d: vc.selective_scan(**_scan(u=[1.0, 2.0])), RuntimeError,
         r"Expected a value of type 'Tensor' for argument 'u' but instead found type 'list'"),
    Case(OP, "non-contiguous u, C and a stride-0 (expanded) B", _non_contiguous_inputs_match_contiguous, None,
         "accepted: the result equals that of contiguous copies"),
    Case(OP, "empty sequence (L = 0)", _empty_sequence_gives_empty_output, None,
         "accepted: y is empty, the last state is zero"),
    Case(REDUCED, "u of rank 2 (the full op's argument checks)", _reduced(u=lambda a: a["u"][0]), ValueError,
         r"'u' has shape \(4, 6\) but expected \(batch, dim, L\)"),
    Case(REDUCED, "groups do not divide the channel count", _reduced(groups=3), ValueError,
         r"reduced_selective_scan: groups=3 must be a positive divisor of the channel count dim=4"),
    Case(REDUCED, "groups = 0", _reduced(groups=0), ValueError,
         r"reduced_selective_scan: groups=0 must be a positive divisor of the channel count dim=4"),
    Case(REDUCED, "groups not a multiple of B's group count", _reduced(groups=1), ValueError,
         r"reduced_selective_scan: groups=1 must be a multiple of B's group count 2, so each reduced channel reads "
         r"one B group; pass groups as the lcm of B's and C's group counts"),
    Case(REDUCED, "groups not a multiple of C's group count",
         _reduced(B=lambda a: a["B"][:, 0], C=torch.zeros(2, 4, 3, 6)), ValueError,
         r"reduced_selective_scan: groups=2 must be a multiple of C's group count 4"),
    Case(REDUCED, "groups missing", lambda d: torch.ops.vmeanba.reduced_selective_scan(**_scan()), RuntimeError,
         r"reduced_selective_scan\(\) is missing value for argument 'groups'"),
    Case(REDUCED, "unknown dt_mode",
         lambda d: torch.ops.vmeanba.reduced_selective_scan(**_scan(), groups=2, dt_mode="mean"), ValueError,
         r"reduced_selective_scan: dt_mode must be one of \('effective', 'raw'\) and skip_mode one of "
         r"\('exact', 'mean'\), got 'mean', 'exact'"),
    Case(REDUCED, "unknown skip_mode",
         lambda d: torch.ops.vmeanba.reduced_selective_scan(**_scan(), groups=2, skip_mode="none"), ValueError,
         r"skip_mode one of \('exact', 'mean'\), got 'effective', 'none'"),
    Case(REDUCED, "integer u", _reduced(u=torch.ones(2, 4, 6, dtype=torch.int64)), TypeError,
         r"'u' has dtype torch\.int64; expected one of float16, bfloat16, float32, float64"),
    Case(REDUCED, "delta in another dtype than u (outside autocast)", _reduced(delta=lambda a: a["delta"].half()),
         TypeError, r"'delta' has dtype torch\.float16 but 'u' has torch\.float32; pass both in one dtype"),
    Case(REDUCED, "an argument on another device", _reduced(A=lambda a: a["A"].to("meta")), RuntimeError,
         r"'A' is on meta but 'u' is on cpu; move all arguments to one device"),
    Case(REDUCED, "non-contiguous u, C and a stride-0 (expanded) B", _reduced_non_contiguous_inputs_match_contiguous,
         None, "accepted: the result equals that of contiguous copies"),
    Case(REDUCED, "empty sequence (L = 0)", _reduced_empty_sequence_gives_empty_output, None,
         "accepted: y is empty, the last state is zero"),
    Case(CAL, "model is not an nn.Module", _calibrate(model=lambda x: x), TypeError,
         r"calibrate: 'model' must be a torch\.nn\.Module"),
    Case(CAL, "batches is one Tensor", _calibrate(batches=IMAGES), TypeError,
         r"calibrate: 'batches' is one Tensor, which would be iterated along its first dimension; pass an "
         r"iterable of batches, e\.g\. \[images\]"),
    Case(CAL, "batches is not iterable", _calibrate(batches=3), TypeError,
         r"calibrate: 'batches' must be an iterable of model inputs"),
    Case(CAL, "no batches", _calibrate(batches=[]), vc.CalibrationError,
         r"calibrate got no batches: pass a non-empty iterable of model inputs"),
    Case(CAL, "a batch of the wrong type", _calibrate(batches=["images"]), vc.CalibrationError,
         r"calibration batch: model inputs must be a Tensor, a tuple/list of positional arguments or a dict"),
    Case(CAL, "loss_fn given but batches are not (inputs, target) pairs",
         _calibrate(loss_fn=torch.nn.functional.cross_entropy), vc.CalibrationError,
         r"with loss_fn, every calibration batch must be a pair \(inputs, target\), got Tensor"),
    Case(CAL, "loss_fn not callable", _calibrate(loss_fn="cross_entropy"), TypeError,
         r"calibrate: 'loss_fn' must be callable as loss_fn\(output, target\) or None"),
    Case(CAL, "max_batches = 0", _calibrate(max_batches=0), ValueError,
         r"calibrate: 'max_batches' must be an int >= 1 or None"),
    Case(CAL, "impact not a bool", _calibrate(impact="no"), TypeError, r"calibrate: 'impact' must be True or False"),
    Case(CAL, "unknown dt_mode", _calibrate(dt_mode="mean"), ValueError,
         r"calibrate: 'dt_mode' must be one of \('effective', 'raw'\), got 'mean'"),
    Case(CAL, "dt_mode contradicting config", _calibrate(dt_mode="raw", config=VMeanbaConfig()), ValueError,
         r"calibrate: dt_mode='raw' contradicts config\.dt_mode='effective'; pass one of them"),
    Case(CAL, "config of the wrong type", _calibrate(config={"dt_mode": "raw"}), TypeError,
         r"calibrate: 'config' must be a vmeanba_compiler\.VMeanbaConfig or None, got dict"),
    Case(CAL, "a model without scan sites",
         lambda d: vc.calibrate(torch.nn.Linear(3, 3), [torch.randn(2, 3)], progress=False), vc.CalibrationError,
         r"no selective-scan sites were found in the model"),
    Case(CAL, "NaN in a calibration batch", lambda d: vc.calibrate(_model(), _poisoned(d), progress=False),
         vc.CalibrationError, r"scan site 'stages\.0\.0\.op:0': its input u has NaN or inf values in calibration batch 1"),
    Case("calibrate_distributed", "no torch.distributed process group",
         lambda d: vc.calibrate_distributed(_model(), [IMAGES]), RuntimeError,
         r"calibrate_distributed needs an initialized torch\.distributed process group"),
    Case(LOAD, "missing file", lambda d: vc.Profile.load(d / "nope.json"), FileNotFoundError,
         r"nope\.json does not exist; create it with vmeanba_compiler\.calibrate"),
    Case(LOAD, "truncated file", lambda d: vc.Profile.load(_truncated_profile_file(d)), ValueError,
         r"is not valid JSON \(truncated or corrupt\?\): .*; re-run calibration"),
    Case(LOAD, "not JSON", lambda d: vc.Profile.load(_profile_file(d, raw=b"\xff\xfe garbage")), ValueError,
         r"is not valid JSON \(truncated or corrupt\?\)"),
    Case(LOAD, "JSON of another format", lambda d: vc.Profile.load(_profile_file(d, raw=b'{"format": "onnx"}')),
         ValueError, r"this is not a vmeanba profile \(expected format 'vmeanba-profile', found 'onnx'\)"),
    Case(LOAD, "older format version", lambda d: vc.Profile.load(_profile_file(d, lambda p: p.update(format_version=0))),
         ValueError, r"format version 0 is no longer supported .*re-run calibration"),
    Case(LOAD, "newer format version", lambda d: vc.Profile.load(_profile_file(d, lambda p: p.update(format_version=99))),
         ValueError, r"format version 99 is newer than this vmeanba-compiler supports .*upgrade vmeanba-compiler"),
    Case(LOAD, "a field of the wrong type",
         lambda d: vc.Profile.load(_profile_file(d, lambda p: p.update(num_batches="2"))), ValueError,
         r"profile field num_batches must be an integer, got '2'"),
    Case("Profile.save", "process killed in the middle of writing", _process_killed_while_saving_leaves_the_old_file,
         None, "accepted: the previous file is intact (writes go to a temporary file, then os.replace); "
               "a hidden .tmp file may remain"),
    Case(OPT, "unknown option", _options(threshhold=0.1), ValueError,
         r"unknown vmeanba option\(s\) 'threshhold'; valid options are: inductor, inductor_config, profile"),
    Case(OPT, "options not a dict", lambda d: VMeanbaConfig.from_options(["inductor"]),
         TypeError, r"vmeanba options must be a dict, got list"),
    Case(OPT, "inductor not a bool", _options(inductor="yes"), TypeError,
         r"vmeanba option 'inductor' must be True or False, got 'yes'"),
    Case(OPT, "inductor_config names an unknown setting", _options(inductor_config={"no_such_setting": 1}),
         ValueError, r"'no_such_setting', which is not a torch\._inductor\.config setting"),
    Case(OPT, "negative threshold", _options(profile=_profile(), threshold=-0.1), ValueError,
         r"vmeanba option 'threshold' must be a finite number >= 0, got -0\.1"),
    Case(OPT, "threshold without a profile", _options(threshold=0.1), ValueError,
         r"'threshold' selects sites from calibration data, but no profile was given: pass profile="),
    Case(OPT, "top_k larger than the number of sites", _options(profile=_profile(), top_k=3), ValueError,
         r"vmeanba option top_k=3 but the profile has only 1 sites; pass top_k <= 1"),
    Case(OPT, "two selection options", _options(profile=_profile(), top_k=1, sites=["stages.0.0.op:0"]), ValueError,
         r"vmeanba options top_k and sites each choose the sites to rewrite; pass only one"),
    Case(OPT, "sites given as one string", _options(sites="stages.0.0.op:0"), TypeError,
         r"vmeanba option 'sites' must be a list of site ids"),
    Case(OPT, "unknown metric", _options(metric="kl"), ValueError,
         r"vmeanba option 'metric' must be one of \('ratio', 'variance'\), got 'kl'"),
    Case(OPT, "profile measured under another dt_mode",
         _options(profile=dataclasses.replace(_profile(), settings={"dt_mode": "raw", "skip_mode": "exact"}),
                  threshold=0.5), vc.ProfileMismatchError,
         r"the profile was calibrated with dt_mode='raw' but the vmeanba options say dt_mode='effective'; .*"
         r"Pass options dt_mode='raw' \(as calibrated\), or re-run vmeanba_compiler\.calibrate with "
         r"dt_mode='effective'"),
    Case(OPT, "profile of the wrong type", _options(profile={"format": "vmeanba-profile"}), TypeError,
         r"vmeanba option 'profile' must be a vmeanba_compiler\.Profile or the path of a saved profile, got dict"),
    Case(OPT, "profile path that does not exist", _options(profile="missing.json", threshold=0.1), FileNotFoundError,
         r"profile file missing\.json does not exist"),
    Case("explain / " + COMPILE, "profile of another model", _explain(profile=_profile(dim=96), threshold=0.5),
         vc.ProfileMismatchError, r"(?s)stages\.0\.0\.op:0 \(differs in dim\).*calibrated on a different model"),
    Case("explain / " + COMPILE, "unknown site id", _explain(sites=["stages.0.0:0"]), ValueError,
         r"vmeanba option 'sites' names unknown site id\(s\) 'stages\.0\.0:0'; the traced model has: stages\.0\.0\.op:0"),
    Case(COMPILE, "unknown mode", _compile(mode="fastest"), torch._dynamo.exc.BackendCompilerFailed,
         r"Unrecognized mode=fastest, should be one of: default"),
    Case("merge_across_ranks", "no torch.distributed process group", lambda d: vc.merge_across_ranks(_profile()),
         RuntimeError, r"merge_across_ranks needs an initialized torch\.distributed process group"),
    Case("SS2D", "routes other than 1, 2 or 4", lambda d: SS2D(8, routes=3), ValueError,
         r"SS2D: routes must be one of \(1, 2, 4\) \(scan directions\), got 3"),
    Case("export", "inputs not a tuple", _export(args=IMAGES, sites=["stages.0.0.op:0"]), TypeError,
         r"export: args must be a tuple of positional inputs, e\.g\. \(x,\), got Tensor"),
    Case("export", "a site id the model does not have", _export(sites=["stages.7.0.op:0"]), ValueError,
         r"vmeanba option 'sites' names unknown site id\(s\) 'stages\.7\.0\.op:0'; the traced model has: "
         r"stages\.0\.0\.op:0"),
    Case("deploy.op_library", "no C++ compiler", _without_cxx, RuntimeError,
         r"building the vmeanba op library .* needs a C\+\+ compiler: install g\+\+ .* or point \$CXX at one"),
    Case("deploy.package", "a program on another device than the CPU", _package_meta_program, NotImplementedError,
         r"the program runs on meta; the op library has CPU functions only"),
]

_OUTCOMES: dict[str, str] = {}  # case id -> what happened, for the docs table


def _run(case: Case, directory: Path) -> str:
    if case.error is None:
        case.call(directory)
        return case.match
    with pytest.raises(case.error, match=case.match) as info:
        case.call(directory)
    return f"`{type(info.value).__name__}`: {_message(info.value, directory)}"


def _message(error: BaseException, directory: Path) -> str:
    """The message up to its first blank line (Dynamo appends advice after one), lines joined by
    <br> for the markdown table."""
    lines = []
    for line in str(error).strip().splitlines():
        if not line.strip():
            break
        lines.append(line.strip().replace(str(directory), "<dir>"))
    return "<br>".join(lines)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_the_documented_error(case: Case, tmp_path: Path) -> None:
    _OUTCOMES[case.id] = _run(case, tmp_path)


def test_case_ids_are_unique() -> None:
    assert len({c.id for c in CASES}) == len(CASES)


def test_docs_table_shows_every_case_and_its_error(tmp_path: Path) -> None:
    rows = ["| entry point | bad input | what happens |", "|---|---|---|"]
    for case in CASES:
        if case.id not in _OUTCOMES:  # the row's own test was deselected: run it here
            directory = tmp_path / case.id
            directory.mkdir()
            _OUTCOMES[case.id] = _run(case, directory)
        cells = (f"`{case.entry}`", case.bad_input, _OUTCOMES[case.id])
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    check_generated_section(DOCS / "BAD_INPUTS.md", "table", "\n".join(rows))
