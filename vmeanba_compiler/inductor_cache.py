"""Keep Inductor's on-disk caches from serving graphs compiled against another version of us.

Inductor keys its FX-graph and AOTAutograd caches on the graph, the inputs, its config and
torch's version, but not on a custom operator's Python code: after an upgrade that changes an
op's fake kernel (the shapes and strides it promises) or its CUDA lowering, a warm cache would
hand back code compiled under the old promises. The one hook Inductor offers for "code outside
the graph that shapes the result" is a custom graph pass's `uuid()`, which it folds into both
keys. So the backend compiles with a post-grad pass whose uuid is a digest of the files that
define our ops for the compiler (`OP_DEFINITIONS`) and the package version; the pass itself only
runs a pass the user configured, if any. The passes need no share in the key: what they do is in
the graph Inductor hashes. Keeping the digest to the op definitions keeps a contributor's warm
cache warm across edits elsewhere.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any, Optional

import torch.fx
from torch._inductor.custom_graph_pass import CustomGraphPass

_CONFIG_KEY = "post_grad_custom_post_pass"


# Modules whose code reaches Inductor outside the graph: op schemas, fake kernels, autocast rules
# (ops.py, reduced_op.py), the CUDA tracing rule that inlines the Triton kernels
# (lowering/cuda_dispatch.py) and those kernels (Inductor's FX-graph key covers their source, but
# its AOTAutograd cache, keyed on the graph before the op is traced into them, does not). A new
# module that registers such things with torch.library or Inductor belongs here
# (tests/test_inductor_cache.py finds them by reading the sources).
OP_DEFINITIONS = (
    "ops.py", "reduced_op.py", "lowering/cuda_dispatch.py",
    "lowering/scan_triton.py", "lowering/vmeanba_triton.py", "lowering/triton_common.py",
)


def op_definition_sources() -> list[Path]:
    """The files of `OP_DEFINITIONS`, as installed (lowering/ maps to vmeanba_compiler.lowering)."""
    from . import lowering

    lowering_dir = Path(lowering.__path__[0])
    package_dir = Path(__file__).parent
    return [lowering_dir / name.split("/", 1)[1] if name.startswith("lowering/") else package_dir / name
            for name in OP_DEFINITIONS]


def files_digest(files: list[Path]) -> str:
    """SHA-256 over the files' names and contents, in the order given."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """The package version and the digest of `op_definition_sources()`, once per process."""
    from . import __version__

    return f"{__version__}:{files_digest(op_definition_sources())}"


class VersionedPostGradPass(CustomGraphPass):
    """Runs the user's own post-grad passes (if any) and keys the cache on our sources too.

    A user pass without a uuid makes ours return None, which tells Inductor not to cache, the
    same as the user's pass alone would."""

    def __init__(self, user_passes: Any) -> None:
        # torch accepts one pass or (newer releases) a list of them
        if user_passes is None:
            user_passes = ()
        elif not isinstance(user_passes, (list, tuple)):
            user_passes = (user_passes,)
        self.user_passes: tuple[Any, ...] = tuple(user_passes)

    def __call__(self, graph: torch.fx.Graph) -> None:
        for user_pass in self.user_passes:
            user_pass(graph)

    def uuid(self) -> Optional[Any]:
        user_uuids = [p.uuid() if isinstance(p, CustomGraphPass) else None for p in self.user_passes]
        if any(u is None for u in user_uuids):
            return None
        return ("vmeanba_compiler", source_digest(), *user_uuids)


def with_versioned_cache_key(patches: dict[str, Any]) -> dict[str, Any]:
    """`patches` plus our post-grad pass, wrapping whichever pass the patches or the global
    Inductor config already set (the user's pass still runs, once)."""
    import torch._inductor.config as inductor_config

    user_pass = patches.get(_CONFIG_KEY, getattr(inductor_config, _CONFIG_KEY))
    if isinstance(user_pass, VersionedPostGradPass):  # already wrapped (nested compile)
        return patches
    return {**patches, _CONFIG_KEY: VersionedPostGradPass(user_pass)}
