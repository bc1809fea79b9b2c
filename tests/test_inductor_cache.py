"""The backend keys Inductor's on-disk caches on our sources, and leaves a user's own pass working."""

from __future__ import annotations

import torch
import torch._inductor.config as inductor_config
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass

from vmeanba_compiler import inductor_cache
from vmeanba_compiler.inductor_cache import VersionedPostGradPass, with_versioned_cache_key


class _CountingPass(CustomGraphPass):
    def __init__(self, uuid=None):
        self.calls = 0
        self._uuid = uuid

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return self._uuid


def _compile_and_count(fn, x, options):
    """Compile `fn` afresh (Dynamo reset) and return the FX-graph cache misses it caused."""
    torch._dynamo.reset()
    before = counters["inductor"]["fxgraph_cache_miss"]
    torch.compile(fn, backend="vmeanba", options=options)(x)
    return counters["inductor"]["fxgraph_cache_miss"] - before


def _double_then_sine(x):
    return torch.sin(x * 2.0) + 1.0


def test_a_change_to_our_sources_misses_the_cache_and_an_unchanged_one_hits(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    options = {"inductor_config": {"fx_graph_cache": True}}
    x = torch.randn(16)
    assert _compile_and_count(_double_then_sine, x, options) == 1  # empty cache
    assert _compile_and_count(_double_then_sine, x, options) == 0  # same sources: served from disk
    monkeypatch.setattr(inductor_cache, "source_digest", lambda: "another release")
    assert _compile_and_count(_double_then_sine, x, options) == 1  # control: the digest is in the key
    torch._dynamo.reset()


def test_a_users_post_grad_pass_still_runs_once_per_graph(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    user_pass = _CountingPass(uuid="user-v1")
    options = {"inductor_config": {"fx_graph_cache": False, "post_grad_custom_post_pass": user_pass}}
    torch._dynamo.reset()
    torch.compile(_double_then_sine, backend="vmeanba", options=options)(torch.randn(8))
    torch._dynamo.reset()
    assert user_pass.calls == 1


def test_the_key_follows_the_users_pass_and_gives_up_caching_as_inductor_would():
    digest = inductor_cache.source_digest()
    assert VersionedPostGradPass(None).uuid() == ("vmeanba_compiler", digest)
    assert VersionedPostGradPass(_CountingPass("u1")).uuid() == ("vmeanba_compiler", digest, "u1")
    assert VersionedPostGradPass([_CountingPass("u1"), _CountingPass("u2")]).uuid()[2:] == ("u1", "u2")
    assert VersionedPostGradPass(_CountingPass(None)).uuid() is None  # Inductor bypasses its cache
    assert VersionedPostGradPass(lambda graph: None).uuid() is None  # a plain callable has no uuid


def test_the_global_config_pass_is_wrapped_and_patches_are_not_mutated():
    global_pass = _CountingPass("global")
    patches = {"max_autotune": False}
    # Inductor's own patch context: pytest's monkeypatch would delete the entry on undo, which
    # hides it from torch._inductor.config for the rest of the process
    with inductor_config.patch(post_grad_custom_post_pass=global_pass):
        wrapped = with_versioned_cache_key(patches)
    assert patches == {"max_autotune": False}
    assert wrapped["post_grad_custom_post_pass"].user_passes == (global_pass,)
    assert with_versioned_cache_key(wrapped) is wrapped  # no double wrapping


def test_the_digest_covers_the_op_definitions_and_follows_file_contents(tmp_path):
    """Every module that registers fake kernels, autocast rules or Inductor/dispatch rules for our
    ops is digested (found by reading the sources, not from the list under test)."""
    import re
    from pathlib import Path

    root = Path(inductor_cache.__file__).resolve().parents[1]
    registering = {
        path.resolve() for folder in ("vmeanba_compiler", "lowering") for path in (root / folder).rglob("*.py")
        if "bench" not in path.parts
        and re.search(r"register_fake|register_autocast|register_torch_dispatch|custom_op\(|register_lowering|py_impl\(|triton\.jit", path.read_text())
    }
    assert registering and registering <= {p.resolve() for p in inductor_cache.op_definition_sources()}
    first, second = tmp_path / "a.py", tmp_path / "b.py"
    first.write_text("x = 1\n")
    second.write_text("y = 2\n")
    before = inductor_cache.files_digest([first, second])
    second.write_text("y = 3\n")
    assert inductor_cache.files_digest([first, second]) != before
