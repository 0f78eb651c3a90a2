"""Token grids: resampling, eager and traced."""

from __future__ import annotations

import pytest
import torch

from cncad.encoders.base import _resampling_matrices, resample_tokens


@pytest.mark.parametrize(("grid", "target"), [((8, 6), (4, 3)), ((4, 3), (8, 6)), ((7, 7), (5, 9))])
def test_traced_resampling_has_a_free_batch_and_equals_the_eager_one(grid, target):
    _resampling_matrices(grid, target)  # built before tracing, as cncad.export does
    tokens = torch.randn(2, grid[0] * grid[1], 5)
    with torch.no_grad():
        traced = torch.jit.trace(lambda t: resample_tokens(t, grid, target), (tokens,))
        for batch in (1, 3):
            other = torch.randn(batch, grid[0] * grid[1], 5)
            got = traced(other)
            assert got.shape == (batch, target[0] * target[1], 5)
            torch.testing.assert_close(got, resample_tokens(other, grid, target), rtol=0, atol=1e-5)


def test_traced_resampling_refuses_matrices_built_inside_the_trace():
    _resampling_matrices.cache_clear()
    tokens = torch.randn(2, 36, 5)
    with torch.no_grad(), pytest.raises(RuntimeError, match="before tracing"):
        torch.jit.trace(lambda t: resample_tokens(t, (6, 6), (3, 3)), (tokens,))


def test_equal_grids_return_the_tokens_themselves():
    tokens = torch.randn(2, 12, 5)
    assert resample_tokens(tokens, (3, 4), (3, 4)) is tokens
