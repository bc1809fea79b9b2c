"""Keep Inductor's on-disk caches from serving graphs compiled against another version of us.

Inductor keys its FX-graph and AOTAutograd caches on the graph, the inputs, its config and
torch's version, but not on a custom operator's Python code: after an upgrade that changes an
op's fake kernel (the shapes and strides it promises) or its CUDA lowering, a warm cache would
hand back code compiled under the old promises. The one hook Inductor offers for "code outside
the graph that shapes the result" is a custom graph pass's `uuid()`, which it folds into both
keys. So the backend compiles with a post-grad pass whose uuid is a digest of this package's
Python sources; the pass itself only runs a pass the user configured, if any.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any, Optional

import torch.fx
from torch._inductor.custom_graph_pass import CustomGraphPass

_CONFIG_KEY = "post_grad_custom_post_pass"


def package_sources() -> list[Path]:
    """Every .py file of vmeanba_compiler and of its mapped passes/lowering packages."""
    from . import lowering, passes

    roots = [Path(__file__).parent, *map(Path, passes.__path__), *map(Path, lowering.__path__)]
    return sorted({f.resolve() for root in roots for f in root.rglob("*.py")})


def files_digest(files: list[Path]) -> str:
    """SHA-256 over the files' names and contents, in the order given."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """The digest of `package_sources()`, computed once per process."""
    return files_digest(package_sources())


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
