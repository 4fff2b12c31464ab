"""The seeded OPORP sketch against materialised references and the JL guarantees it must keep."""

import hashlib
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from diffusers_dmin import ConfigError
from diffusers_dmin.sketch import OPORPSketch, fold_sketch


@pytest.mark.parametrize("dim", [1, 2, 3, 7, 64, 1000, 4097, 65537])
def test_permutation_is_a_bijection(dim):
    sketch = OPORPSketch(dim, 8, seed=3)
    positions = sketch.permutation(0, dim)
    assert positions.dtype == torch.int64
    assert torch.equal(positions.sort().values, torch.arange(dim))
    # segments agree with the whole
    cut = dim // 3
    assert torch.equal(torch.cat([sketch.permutation(0, cut), sketch.permutation(cut, dim - cut)]), positions)


def test_permutation_looks_random_and_depends_on_seed():
    dim = 10_000
    a = OPORPSketch(dim, 16, seed=0).permutation(0, dim).double()
    b = OPORPSketch(dim, 16, seed=1).permutation(0, dim).double()
    identity = torch.arange(dim, dtype=torch.float64)
    # no linear trace of the identity, and two seeds are unrelated
    assert abs(torch.corrcoef(torch.stack([a, identity]))[0, 1]) < 0.05
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 0.05
    # neighbours do not stay neighbours
    assert (a[1:] - a[:-1]).abs().median() > dim / 10


@pytest.mark.parametrize("dim,k", [(1000, 64), (1024, 64), (999, 1000), (5, 2)])
def test_buckets_are_balanced_and_signs_are_fair(dim, k):
    buckets, signs = OPORPSketch(dim, k, seed=0).buckets_and_signs(0, dim)
    counts = torch.bincount(buckets, minlength=k)
    assert counts.min() >= dim // k and counts.max() <= -(-dim // k)
    assert set(signs.unique().tolist()) <= {-1.0, 1.0}
    if dim >= 1000:
        assert abs(signs.mean()) < 0.1


def _naive_padded_sketch(x, sketch):
    """DMin's official recipe with a materialised permutation: gather into permuted order, multiply by the signs,
    lay the D positions into K contiguous blocks (zero padding where a block is short) and sum each block."""
    dim, k = sketch.input_dim, sketch.sketch_dim
    positions = sketch.permutation(0, dim)
    inverse = torch.empty_like(positions)
    inverse[positions] = torch.arange(dim)  # inverse[j] = coordinate at permuted position j (the official `perm`)
    signs_by_position = torch.empty(dim)
    _, signs = sketch.buckets_and_signs(0, dim)
    signs_by_position[positions] = signs
    permuted = x[..., inverse] * signs_by_position
    width = -(-dim // k)
    padded = torch.zeros(*x.shape[:-1], k, width, dtype=x.dtype)
    for j in range(k):  # block j holds positions [ceil(j D / K), ceil((j + 1) D / K))
        lo, hi = -(-j * dim // k), -(-(j + 1) * dim // k)
        padded[..., j, : hi - lo] = permuted[..., lo:hi]
    return padded.sum(-1)


@pytest.mark.parametrize("dim,k", [(1024, 16), (4096, 256), (1000, 64), (777, 100), (50, 64)])
def test_matches_the_materialised_official_recipe(dim, k):
    sketch = OPORPSketch(dim, k, seed=11)
    x = torch.randn(3, dim, dtype=torch.float64)
    reference = _naive_padded_sketch(x, sketch)
    torch.testing.assert_close(sketch(x.float()).double(), reference, rtol=1e-5, atol=1e-5)
    if dim % k == 0:  # exactly the official reshape-sum, no padding involved
        positions = sketch.permutation(0, dim)
        inverse = torch.empty_like(positions)
        inverse[positions] = torch.arange(dim)
        _, signs = sketch.buckets_and_signs(0, dim)
        r = torch.empty(dim)
        r[positions] = signs
        official = (x[:, inverse] * r).reshape(3, k, dim // k).sum(-1)
        torch.testing.assert_close(sketch(x.float()).double(), official, rtol=1e-5, atol=1e-5)


def test_dense_matrix_reference():
    dim, k = 300, 32
    sketch = OPORPSketch(dim, k, seed=5)
    buckets, signs = sketch.buckets_and_signs(0, dim)
    matrix = torch.zeros(k, dim)
    matrix[buckets, torch.arange(dim)] = signs
    x = torch.randn(4, dim)
    torch.testing.assert_close(sketch(x), x @ matrix.T)


def test_inner_products_within_jl_bound():
    dim, k, n = 20_000, 1024, 40
    torch.manual_seed(0)
    x = torch.randn(n, dim)
    x = x / x.norm(dim=1, keepdim=True)
    sketch = OPORPSketch(dim, k, seed=0)
    sx = sketch(x)
    mask = ~torch.eye(n, dtype=torch.bool)
    errors = (sx @ sx.T - x @ x.T)[mask]
    assert errors.abs().max() <= 4 / math.sqrt(k)
    # the spread matches the theory of a balanced count-sketch: Var ~ (1 + rho^2) / K, rho ~ 0 here
    assert 0.8 / math.sqrt(k) < errors.std() < 1.2 / math.sqrt(k)
    # norms are preserved too
    assert (sx.norm(dim=1) - 1).abs().max() <= 4 / math.sqrt(k)


@pytest.mark.parametrize("dim,k", [(100, 100), (100, 128), (37, 4096)])
def test_sketch_dim_at_least_input_dim_is_exact(dim, k):
    sketch = OPORPSketch(dim, k, seed=2)
    x = torch.randn(5, dim, dtype=torch.float32)
    sx = sketch(x)
    torch.testing.assert_close(sx @ sx.T, x @ x.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dim", [10_000, 10_001, 333])
def test_folding_equals_sketching_directly(dim):
    x = torch.randn(2, dim)
    big = OPORPSketch(dim, 1024, seed=9)(x)
    for small in (512, 128, 16, 1):
        torch.testing.assert_close(fold_sketch(big, small), OPORPSketch(dim, small, seed=9)(x), rtol=1e-4, atol=1e-4)
    # any divisor folds, not only powers of two
    x3 = torch.randn(2, dim)
    torch.testing.assert_close(
        fold_sketch(OPORPSketch(dim, 96, seed=1)(x3), 32), OPORPSketch(dim, 32, seed=1)(x3), rtol=1e-4, atol=1e-4
    )
    with pytest.raises(ConfigError, match="divisor"):
        fold_sketch(big, 300)


def test_streaming_segments_and_tables_match_whole_vectors():
    dim, k = 50_000, 256
    x = torch.randn(3, dim)
    whole = OPORPSketch(dim, k, seed=4, table_budget_bytes=0, chunk_size=1000)(x)
    tabled = OPORPSketch(dim, k, seed=4, table_budget_bytes=2**30)
    acc = tabled.new_accumulator(3)
    cuts = [0, 17, 4096, 30_000, dim]
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        tabled.accumulate(acc, x[:, lo:hi], lo)
    torch.testing.assert_close(tabled.finalize(acc), whole, rtol=1e-5, atol=1e-5)
    assert tabled.table_bytes == 8 * dim
    # a second pass uses the cached tables and gives the same numbers
    acc2 = tabled.new_accumulator(3)
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        tabled.accumulate(acc2, x[:, lo:hi], lo)
    torch.testing.assert_close(tabled.finalize(acc2), whole, rtol=1e-5, atol=1e-5)


def test_huge_input_dims_need_no_memory_and_stay_in_range():
    dim = 2**33 + 12345  # beyond 32-bit positions: exercises the second sign hash
    sketch = OPORPSketch(dim, 4096, seed=0)
    for start in (0, 2**32 - 5, dim - 1000):
        buckets, signs = sketch.buckets_and_signs(start, 1000)
        assert buckets.min() >= 0 and buckets.max() < 4096
        positions = sketch.permutation(start, 1000)
        assert positions.min() >= 0 and positions.max() < dim
        assert positions.unique().numel() == 1000
    with pytest.raises(ConfigError, match="2\\*\\*62"):
        OPORPSketch(2**40, 2**24)


def test_bad_arguments_raise_config_errors():
    with pytest.raises(ConfigError, match="input_dim"):
        OPORPSketch(0, 4)
    with pytest.raises(ValueError, match="sketch_dim"):
        OPORPSketch(10, 0)
    with pytest.raises(ConfigError, match="outside"):
        OPORPSketch(10, 4).permutation(5, 10)
    with pytest.raises(ConfigError, match="dimension 10"):
        OPORPSketch(10, 4)(torch.zeros(3, 11))


_SCRIPT = textwrap.dedent(
    """
    import hashlib, torch
    from diffusers_dmin.sketch import OPORPSketch
    s = OPORPSketch(123_457, 512, seed=42)
    b, sg = s.buckets_and_signs(0, 123_457)
    print(hashlib.sha256(b.numpy().tobytes() + sg.numpy().tobytes()).hexdigest())
    """
)


def test_identical_across_processes():
    sketch = OPORPSketch(123_457, 512, seed=42)
    buckets, signs = sketch.buckets_and_signs(0, 123_457)
    here = hashlib.sha256(buckets.numpy().tobytes() + signs.numpy().tobytes()).hexdigest()
    there = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, check=True).stdout.strip()
    assert here == there


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_cuda_agree():
    dim, k = 1_000_003, 4096
    sketch = OPORPSketch(dim, k, seed=7, table_budget_bytes=0)
    cpu_codes = sketch._codes(0, dim, "cpu")
    cuda_codes = sketch._codes(0, dim, "cuda")
    assert torch.equal(cpu_codes, cuda_codes.cpu())
    x = torch.randn(4, dim)
    torch.testing.assert_close(sketch(x), sketch(x.cuda()).cpu(), rtol=1e-4, atol=1e-4)
