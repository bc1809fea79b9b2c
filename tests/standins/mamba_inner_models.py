"""User model code calling mamba_ssm's fused block functions (tests only).

Written after the Mamba block of state-spaces/mamba (mamba_ssm/modules/mamba_simple.py, its
`use_fast_path` branch) and the bidirectional block of Vision Mamba (hustvl/Vim,
mamba-1p1p1/mamba_ssm/modules/mamba_simple.py, `bimamba_type` "v1" and "v2"), at toy sizes. The
functions are bound at this module's level by `from ... import ...`, as those files do.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mamba_ssm.ops.selective_scan_interface import (
    bimamba_inner_fn,
    bimamba_inner_ref,
    mamba_inner_fn,
    mamba_inner_fn_no_out_proj,
    mamba_inner_ref,
)


def _s4d_real_A_log(d_inner: int, d_state: int) -> nn.Parameter:
    return nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))


class _Direction(nn.Module):
    """The per-direction weights of a block: depthwise conv, x_proj, dt_proj, A_log, D."""

    def __init__(self, d_inner: int, d_state: int, d_conv: int, dt_rank: int) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner)
        with torch.no_grad():  # softplus(bias) in [0.01, 0.1], as Mamba's dt init
            dt = torch.exp(torch.linspace(math.log(0.01), math.log(0.1), d_inner))
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = _s4d_real_A_log(d_inner, d_state)
        self.D = nn.Parameter(torch.ones(d_inner))


class MambaBlock(nn.Module):
    """Mamba's block on its fast path: (batch, L, d_model) -> (batch, L, d_model).

    inner: "fn" calls `mamba_inner_fn` (whichever signature the module has), "ref" calls
    `mamba_inner_ref`. rms: pass RMS-norm weights for B, C and dt (mamba_ssm >= 2.2.3 only).
    """

    def __init__(self, d_model: int = 8, d_state: int = 4, d_conv: int = 4, expand: int = 2,
                 inner: str = "fn", rms: bool = False) -> None:
        super().__init__()
        d_inner = expand * d_model
        self.inner, self.rms = inner, rms
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.ssm = _Direction(d_inner, d_state, d_conv, math.ceil(d_model / 16))
        self.out_proj = nn.Linear(d_inner, d_model, bias=True)
        if rms:
            self.register_buffer("b_c_rms", torch.linspace(0.5, 1.5, d_state))
            self.register_buffer("dt_rms", torch.linspace(0.8, 1.2, d_inner))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seqlen, dim = hidden_states.shape
        # Mamba's layout trick: one matmul gives xz as (batch, 2*d_inner, L), L fastest.
        xz = (self.in_proj.weight @ hidden_states.reshape(batch * seqlen, dim).t())
        xz = xz.reshape(-1, batch, seqlen).permute(1, 0, 2)
        s = self.ssm
        A = -torch.exp(s.A_log.float())
        args = (xz, s.conv1d.weight, s.conv1d.bias, s.x_proj.weight, s.dt_proj.weight,
                self.out_proj.weight, self.out_proj.bias, A, None, None, s.D.float())
        if self.inner == "ref":
            return mamba_inner_ref(*args, delta_bias=s.dt_proj.bias.float(), delta_softplus=True)
        if self.rms:
            return mamba_inner_fn(*args, delta_bias=s.dt_proj.bias.float(), delta_softplus=True,
                                  b_rms_weight=self.b_c_rms, c_rms_weight=self.b_c_rms,
                                  dt_rms_weight=self.dt_rms, b_c_dt_rms_eps=1e-5)
        return mamba_inner_fn(*args, delta_bias=s.dt_proj.bias.float(), delta_softplus=True)


class VimBlock(nn.Module):
    """Vision Mamba's bidirectional block.

    bimamba_type "v1": one `bimamba_inner_fn` call (or `bimamba_inner_ref` with ref=True) with a
    second A for the backward direction. "v2": two `mamba_inner_fn_no_out_proj` calls, the
    second on xz flipped in time with its own conv, projections, A and D; the block sums the two
    directions (halved when `if_divide_out`) and applies out_proj itself.
    """

    def __init__(self, d_model: int = 8, d_state: int = 4, d_conv: int = 4, expand: int = 2,
                 bimamba_type: str = "v2", if_divide_out: bool = True, ref: bool = False) -> None:
        super().__init__()
        d_inner = expand * d_model
        rank = math.ceil(d_model / 16)
        self.bimamba_type, self.if_divide_out, self.ref = bimamba_type, if_divide_out, ref
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.fwd = _Direction(d_inner, d_state, d_conv, rank)
        if bimamba_type == "v1":  # only A is the backward direction's own
            self.A_b_log = _s4d_real_A_log(d_inner, d_state)
        else:  # everything is (its A_log is Vim's A_b_log)
            self.bwd = _Direction(d_inner, d_state, d_conv, rank)
        self.out_proj = nn.Linear(d_inner, d_model, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seqlen, dim = hidden_states.shape
        xz = (self.in_proj.weight @ hidden_states.reshape(batch * seqlen, dim).t())
        xz = xz.reshape(-1, batch, seqlen).permute(1, 0, 2)
        f = self.fwd
        A = -torch.exp(f.A_log.float())
        if self.bimamba_type == "v1":
            A_b = -torch.exp(self.A_b_log.float())
            fn = bimamba_inner_ref if self.ref else bimamba_inner_fn
            return fn(xz, f.conv1d.weight, f.conv1d.bias, f.x_proj.weight, f.dt_proj.weight,
                      self.out_proj.weight, self.out_proj.bias, A, A_b, None, None, f.D.float(),
                      delta_bias=f.dt_proj.bias.float(), delta_softplus=True)
        b = self.bwd
        A_b = -torch.exp(b.A_log.float())
        out = mamba_inner_fn_no_out_proj(xz, f.conv1d.weight, f.conv1d.bias, f.x_proj.weight,
                                         f.dt_proj.weight, A, None, None, f.D.float(),
                                         delta_bias=f.dt_proj.bias.float(), delta_softplus=True)
        out_b = mamba_inner_fn_no_out_proj(xz.flip([-1]), b.conv1d.weight, b.conv1d.bias, b.x_proj.weight,
                                           b.dt_proj.weight, A_b, None, None, b.D.float(),
                                           delta_bias=b.dt_proj.bias.float(), delta_softplus=True)
        both = (out + out_b.flip([-1])).transpose(1, 2)
        if self.if_divide_out:
            both = both / 2
        return F.linear(both, self.out_proj.weight, self.out_proj.bias)


class Classifier(nn.Module):
    """Tokens (batch, L, in_features) -> logits, through residual blocks: what calibrate needs."""

    def __init__(self, block: nn.Module, in_features: int = 3, d_model: int = 8, num_classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Linear(in_features, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.mixer = block
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + self.mixer(self.norm(h))
        return self.head(h.mean(dim=1))
