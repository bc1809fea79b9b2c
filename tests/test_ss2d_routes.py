"""SS2D with K = 1, 2 or 4 scan routes (VMamba's unidirectional, bidirectional and cross-scan)."""

from __future__ import annotations

import pytest
import torch

from vmeanba_compiler.models.ss2d import ROUTE_CHOICES, ROUTES, SS2D, cross_merge, cross_scan
from vmeanba_compiler.passes.scan_sites import find_scan_sites


@pytest.mark.parametrize("routes", ROUTE_CHOICES)
def test_cross_merge_is_the_adjoint_of_cross_scan(routes: int) -> None:
    gen = torch.Generator().manual_seed(routes)
    x = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(2, routes, 3, 20, generator=gen, dtype=torch.float64)
    assert cross_scan(x, routes).shape == (2, routes, 3, 20)
    torch.testing.assert_close((cross_scan(x, routes) * y).sum(), (x * cross_merge(y, 4, 5)).sum())
    torch.testing.assert_close(cross_merge(cross_scan(x, routes), 4, 5), routes * x)


def test_fewer_routes_are_the_leading_rows_of_row_major_reading() -> None:
    x = torch.arange(6.0).view(1, 1, 2, 3)  # [[0, 1, 2], [3, 4, 5]]
    assert cross_scan(x, 1)[0, :, 0].tolist() == [[0, 1, 2, 3, 4, 5]]
    assert cross_scan(x, 2)[0, :, 0].tolist() == [[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]]


@pytest.mark.parametrize("routes", [0, 3, 8])
def test_other_route_counts_are_refused(routes: int) -> None:
    with pytest.raises(ValueError, match=r"routes must be one of \(1, 2, 4\)"):
        cross_scan(torch.zeros(1, 1, 2, 2), routes)
    with pytest.raises(ValueError, match=r"with K in \(1, 2, 4\)"):
        cross_merge(torch.zeros(1, routes, 1, 4), 2, 2)


def test_default_is_the_published_four_routes() -> None:
    assert ROUTES == 4 and SS2D(8).routes == 4


@pytest.mark.parametrize("routes", ROUTE_CHOICES)
def test_one_grouped_scan_with_one_group_per_route(routes: int) -> None:
    torch.manual_seed(0)
    op = SS2D(8, d_state=2, routes=routes).eval()
    assert op.x_proj_weight.shape[0] == op.dt_projs_weight.shape[0] == routes
    assert op.A_logs.shape == (routes * op.d_inner, 2)
    graphs = []

    def capture(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(op, backend=capture)(torch.randn(2, 3, 4, 8))
    torch._dynamo.reset()
    assert out.shape == (2, 3, 4, 8)
    (site,) = find_scan_sites(graphs[0])
    assert (site.groups, site.dim, site.b_form) == (routes, routes * op.d_inner, "grouped")
