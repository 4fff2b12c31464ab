"""QueryPreconditioner: the damped inverse against a direct solve, centring, and the file's checks."""

import json
import struct

import pytest
import torch

from diffusers_dmin.errors import ConfigError, IndexCorruptError
from diffusers_dmin.precondition import QueryPreconditioner


def _rows(n=40, t=2, k=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, k, generator=generator) + 0.5


@pytest.mark.parametrize("center", [False, True])
def test_fit_matches_direct_solve_and_streams(center):
    x = _rows()
    pre = QueryPreconditioner.fit([x[:15], x[15:]], damping=0.1, center=center)
    q = _rows(3, seed=1)
    x64, q64 = x.double(), q.double()
    mu = x64.mean(0)
    expected = []
    for t in range(2):
        xt = x64[:, t] - mu[t] if center else x64[:, t]
        sigma = xt.T @ xt / len(x)
        lam = 0.1 * sigma.trace() / 8
        qt = q64[:, t] - mu[t] if center else q64[:, t]
        expected.append(torch.linalg.solve(sigma + lam * torch.eye(8, dtype=torch.float64), qt.T).T)
    torch.testing.assert_close(pre.apply(q).double(), torch.stack(expected, 1), rtol=1e-4, atol=1e-5)
    assert pre.num_rows == 40 and pre.centered == center
    # scores of the preconditioned query against uncentred rows rank like fully centred scores
    if center:
        full = torch.einsum("qtk,ntk->qn", pre.apply(q).double(), x64 - mu)
        half = torch.einsum("qtk,ntk->qn", pre.apply(q).double(), x64)
        torch.testing.assert_close(full - full[:, :1], half - half[:, :1], rtol=1e-6, atol=1e-8)


def test_large_damping_tends_to_plain_scores():
    x, q = _rows(), _rows(3, seed=1)
    pre = QueryPreconditioner.fit([x], damping=1e6)
    scale = pre.lambdas[0].item()
    torch.testing.assert_close(pre.apply(q)[:, 0] * scale, q[:, 0], rtol=1e-3, atol=1e-4)


def test_validation():
    with pytest.raises(ConfigError, match="damping"):
        QueryPreconditioner.fit([_rows()], damping=0)
    with pytest.raises(ConfigError, match="empty"):
        QueryPreconditioner.fit([], damping=0.1)
    pre = QueryPreconditioner.fit([_rows()], damping=0.1)
    with pytest.raises(ConfigError, match="do not match"):
        pre.apply(torch.zeros(1, 2, 4))


def test_file_round_trip_and_corruption(tmp_path):
    pre = QueryPreconditioner.fit([_rows()], damping=0.1, center=True)
    path = pre.save(tmp_path / "p.safetensors")
    back = QueryPreconditioner.load(path, num_timesteps=2, sketch_dim=8)
    torch.testing.assert_close(back.inverse, pre.inverse)
    torch.testing.assert_close(back.mean, pre.mean)
    assert back.damping == 0.1 and back.num_rows == 40
    with pytest.raises(IndexCorruptError, match="expected F32"):
        QueryPreconditioner.load(path, num_timesteps=2, sketch_dim=4)
    # a header that claims more data than the file holds is refused before safetensors parses it
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    header["inverse"]["data_offsets"][1] += 4
    text = json.dumps(header).encode()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])
    with pytest.raises(IndexCorruptError, match="data offsets"):
        QueryPreconditioner.load(bad, num_timesteps=2, sketch_dim=8)
    # non-finite values
    nan = QueryPreconditioner(pre.inverse * float("nan"), None, pre.lambdas, 0.1, 40)
    nan.save(tmp_path / "nan.safetensors")
    with pytest.raises(IndexCorruptError, match="NaN"):
        QueryPreconditioner.load(tmp_path / "nan.safetensors", num_timesteps=2, sketch_dim=8)
