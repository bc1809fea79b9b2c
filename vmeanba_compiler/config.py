"""The backend's one configuration object, built from `torch.compile(..., options={...})`.

Every option is validated here, once: an unknown name or a value of the wrong type is an error
that lists what is accepted, so a typo never silently compiles the model without the intended
setting.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Optional


def _check_inductor_key(key: str) -> None:
    import torch._inductor.config as inductor_config

    node: Any = inductor_config
    for part in key.split("."):
        if not hasattr(node, part):
            raise ValueError(
                f"vmeanba option 'inductor_config' names {key!r}, which is not a "
                "torch._inductor.config setting (see torch._inductor.config for the valid names)"
            )
        node = getattr(node, part)


@dataclass(frozen=True)
class VMeanbaConfig:
    """Options of the `vmeanba` backend.

    inductor: lower the (rewritten) graph through TorchInductor (default). False runs the
        rewritten FX graph eagerly: the reference to compare compiled results with.
    inductor_config: settings passed to Inductor as config patches, e.g.
        {"max_autotune": True}; names are checked against torch._inductor.config.
    """

    inductor: bool = True
    inductor_config: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_options(cls, options: Optional[Mapping[str, Any]] = None) -> "VMeanbaConfig":
        """Validate `torch.compile` options into a config; raise naming the bad option."""
        if options is None:
            return cls()
        if not isinstance(options, Mapping):
            raise TypeError(
                f"vmeanba options must be a dict, got {type(options).__name__}; "
                f"valid keys: {', '.join(cls.option_names())}"
            )
        unknown = sorted(set(options) - set(cls.option_names()))
        if unknown:
            raise ValueError(
                f"unknown vmeanba option(s) {', '.join(map(repr, unknown))}; "
                f"valid options are: {', '.join(cls.option_names())}"
            )
        inductor = options.get("inductor", True)
        if not isinstance(inductor, bool):
            raise TypeError(f"vmeanba option 'inductor' must be True or False, got {inductor!r}")
        patches = options.get("inductor_config", {})
        if not isinstance(patches, Mapping) or not all(isinstance(k, str) for k in patches):
            raise TypeError(
                "vmeanba option 'inductor_config' must be a dict of torch._inductor.config "
                f"names to values, got {patches!r}"
            )
        for key in patches:
            _check_inductor_key(key)
        return cls(inductor=inductor, inductor_config=MappingProxyType(dict(patches)))
