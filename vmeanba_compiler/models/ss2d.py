"""SS2D, VMamba's 2D selective-scan mixer, built on the project's `selective_scan` op.

An image is read as four 1D sequences (row-major, column-major, and both reversed), so that
every pixel sees context from all four directions. The four routes are stacked on the channel
axis and scanned by ONE `selective_scan` call (K=4 groups of d_inner channels, grouped B/C),
which is exactly the call site the VMeanba pass rewrites (docs/DESIGN.md section 1).

VMamba's lighter variants read fewer routes: K=2 (row-major and its reverse, "bidirectional")
or K=1 (row-major only); `SS2D(routes=...)` selects them. The default is the published K=4.
"""

from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import selective_scan

ROUTES = 4  # K: row-major, column-major, row-major reversed, column-major reversed
ROUTE_CHOICES = (1, 2, 4)  # row-major only; plus its reverse; all four


def cross_scan(x: Tensor, routes: int = ROUTES) -> Tensor:
    """(B, d, H, W) -> (B, K, d, H*W): the K scan routes, stacked on a new K axis.

    K=4: row-major, column-major, and both reversed; K=2: row-major and row-major reversed;
    K=1: row-major.
    """
    rows = x.flatten(2)  # row-major: W varies fastest
    if routes == 1:
        return rows.unsqueeze(1)
    if routes == 2:
        return torch.stack([rows, rows.flip(-1)], dim=1)
    if routes != 4:
        raise ValueError(f"cross_scan: routes must be one of {ROUTE_CHOICES}, got {routes!r}")
    cols = x.transpose(2, 3).flatten(2)  # column-major: H varies fastest
    forward = torch.stack([rows, cols], dim=1)
    return torch.cat([forward, forward.flip(-1)], dim=1)


def cross_merge(y: Tensor, height: int, width: int) -> Tensor:
    """(B, K, d, H*W) -> (B, d, H, W): undo each route's flip/transpose and sum the routes.

    The adjoint of `cross_scan` (K read off y's shape), so cross_merge(cross_scan(x, K)) == K * x.
    """
    batch, routes, dim, length = y.shape
    if routes not in ROUTE_CHOICES or length != height * width:
        raise ValueError(
            f"cross_merge: expected (B, K, d, {height}*{width}) with K in {ROUTE_CHOICES}, got {tuple(y.shape)}"
        )
    if routes == 1:
        return y[:, 0].reshape(batch, dim, height, width)
    if routes == 2:
        return (y[:, 0] + y[:, 1].flip(-1)).reshape(batch, dim, height, width)
    y = y[:, :2] + y[:, 2:].flip(-1)  # fold the reversed routes onto the forward ones
    rows = y[:, 0].reshape(batch, dim, height, width)
    cols = y[:, 1].reshape(batch, dim, width, height).transpose(2, 3)
    return rows + cols


def _dt_bias_init(size: int, dt_min: float = 1e-3, dt_max: float = 1e-1, floor: float = 1e-4) -> Tensor:
    """Mamba's step init: dt log-uniform in [dt_min, dt_max]; the bias is softplus^-1(dt), so the
    op's softplus(delta + bias) starts at a useful time scale."""
    log_dt = torch.rand(size) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = torch.exp(log_dt).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse of softplus


class SS2D(nn.Module):
    """Selective-scan 2D mixer on channels-last input (B, H, W, C) -> (B, H, W, C).

    in_proj -> depthwise 3x3 conv + SiLU -> cross_scan -> x_proj / dt_projs -> ONE selective_scan
    over K*d_inner channels -> cross_merge -> LayerNorm -> [* silu(z)] -> out_proj.
    routes: K, the number of scan routes (1, 2 or 4; see `cross_scan`).
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        ssm_ratio: float = 2.0,
        dt_rank: Union[int, str] = "auto",
        gated: bool = True,
        d_conv: int = 3,
        routes: int = ROUTES,
    ) -> None:
        super().__init__()
        if routes not in ROUTE_CHOICES:
            raise ValueError(f"SS2D: routes must be one of {ROUTE_CHOICES} (scan directions), got {routes!r}")
        d_inner = int(ssm_ratio * dim)
        rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        self.d_inner, self.d_state, self.dt_rank, self.gated = d_inner, d_state, rank, gated
        self.routes = k = routes

        self.in_proj = nn.Linear(dim, d_inner * (2 if gated else 1), bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner)
        self.act = nn.SiLU()

        # Per-route projections kept as stacked parameters so one einsum serves all K routes.
        proj_bound = d_inner**-0.5
        self.x_proj_weight = nn.Parameter(
            torch.empty(k, rank + 2 * d_state, d_inner).uniform_(-proj_bound, proj_bound)
        )
        dt_bound = rank**-0.5
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, rank).uniform_(-dt_bound, dt_bound))
        self.dt_projs_bias = nn.Parameter(_dt_bias_init(k * d_inner))
        # S4D-real init: A[c] = -(1..N), stored as a log so A stays negative under training.
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(k * d_inner, 1)
        self.A_logs = nn.Parameter(torch.log(a))
        self.Ds = nn.Parameter(torch.ones(k * d_inner))

        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, _ = x.shape
        length, k, d, n, r = height * width, self.routes, self.d_inner, self.d_state, self.dt_rank

        xz = self.in_proj(x)
        if self.gated:
            x, z = xz.chunk(2, dim=-1)
        else:
            x, z = xz, None
        x = self.act(self.conv2d(x.permute(0, 3, 1, 2).contiguous()))

        xs = cross_scan(x, k)  # (B, K, d, L)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dts, bs, cs = torch.split(x_dbl, [r, n, n], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)

        y = selective_scan(
            xs.reshape(batch, k * d, length),
            dts.reshape(batch, k * d, length),
            -torch.exp(self.A_logs.float()),
            bs.contiguous(),
            cs.contiguous(),
            self.Ds.float(),
            delta_bias=self.dt_projs_bias.float(),
            delta_softplus=True,
        )
        y = cross_merge(y.view(batch, k, d, length), height, width)
        y = self.out_norm(y.permute(0, 2, 3, 1))  # (B, H, W, d)
        if z is not None:
            y = y * F.silu(z)
        return self.out_proj(y)
