"""LatentStats: exact and reference estimators, apply_to, and a 2-process gloo all-reduce."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dmvae.latent_stats import LatentStats


def _latents() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # uneven batch sizes and a non-trivial mean/std, shaped like DMVAE tokens (B, 16, 8)
    return [torch.randn(b, 16, 8, generator=g) * 5.7 + 0.07 for b in (5, 3, 7, 1, 4)]


def test_exact_matches_whole_dataset() -> None:
    zs = _latents()
    stats = LatentStats()
    for z in zs:
        stats.update(z)
    mean, scale = stats.compute()
    allz = torch.cat([z.flatten() for z in zs]).double()
    assert mean == pytest.approx(allz.mean().item(), rel=1e-12, abs=1e-12)
    assert scale == pytest.approx(1.0 / allz.std().item(), rel=1e-12)
    # independent of batching
    s2 = LatentStats()
    s2.update(torch.cat([z.flatten() for z in zs]))
    assert s2.compute() == pytest.approx((mean, scale), rel=1e-12)


def test_reference_estimator() -> None:
    zs = _latents()
    stats = LatentStats(estimator="reference")
    for z in zs:
        stats.update(z)
    mean, scale = stats.compute()
    exp_mean = sum(z.double().mean().item() for z in zs) / len(zs)
    exp_scale = sum(1.0 / (z.double().std().item() + 1e-8) for z in zs) / len(zs)
    assert mean == pytest.approx(exp_mean, rel=1e-12)
    assert scale == pytest.approx(exp_scale, rel=1e-12)
    assert scale != pytest.approx(LatentStats.from_loader(lambda b: b, zs).scale, rel=1e-6)


@dataclasses.dataclass
class _Cfg:
    latent_mean: float = 0.0
    latent_scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class _FrozenCfg:
    latent_mean: float = 0.0
    latent_scale: float = 1.0


class _Model(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.config = config


def test_from_loader_and_apply_to() -> None:
    zs = _latents()
    loader = torch.utils.data.DataLoader(torch.cat(zs), batch_size=6)
    stats = LatentStats.from_loader(lambda b: b * 2.0, loader, max_batches=2)
    assert stats.count == 12 * 16 * 8 and stats.num_batches == 2
    m = _Model(_Cfg())
    mean, scale = stats.apply_to(m)
    assert (m.config.latent_mean, m.config.latent_scale) == (mean, scale)
    fm = _Model(_FrozenCfg())
    stats.apply_to(fm)
    assert fm.config.latent_scale == scale
    with pytest.raises(AttributeError, match="latent_mean"):
        stats.apply_to(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="update"):
        LatentStats().compute()
    with pytest.raises(ValueError, match="estimator"):
        LatentStats(estimator="ema")  # type: ignore[arg-type]


_WORKER = r"""
import json, os, random, sys
import numpy as np
import torch
from dmvae.dist import init_distributed, all_reduce_mean, is_main_process, cleanup_distributed
from dmvae.latent_stats import LatentStats
from dmvae.training.checkpoint import save_checkpoint, load_checkpoint

info = init_distributed()
assert info.backend == "gloo" and info.world_size == 2, info
r = info.rank
g = torch.Generator().manual_seed(0)
zs = [torch.randn(b, 16, 8, generator=g) * 5.7 + 0.07 for b in (5, 3, 7, 1, 4)]
mine = zs[:2] if r == 0 else zs[2:]  # unequal shards
out = {}
for est in ("exact", "reference"):
    s = LatentStats(estimator=est)
    for z in mine:
        s.update(z)
    out[est] = s.compute()
out["mean_of_ranks"] = all_reduce_mean(torch.tensor([float(r)])).item()

# checkpoint: every rank calls save/load; each rank gets its own RNG state back
torch.manual_seed(100 + r); np.random.seed(100 + r); random.seed(100 + r)
save_checkpoint(sys.argv[1], 1, w=torch.tensor([1.0]))
expected = (torch.rand(3).tolist(), np.random.rand(2).tolist(), random.random())
load_checkpoint(sys.argv[1])
got = (torch.rand(3).tolist(), np.random.rand(2).tolist(), random.random())
out["rng_restored"] = got == expected
out["rng_draw"] = expected[0]
with open(os.path.join(sys.argv[1], f"rank{r}.json"), "w") as f:
    json.dump(out, f)
cleanup_distributed()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo(tmp_path: Path) -> None:
    """Two real processes (torchrun's environment variables, gloo on CPU)."""
    import subprocess

    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(
            os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
        )  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-3000:]
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    zs = _latents()
    single = LatentStats()
    for z in zs:
        single.update(z)
    ref = LatentStats(estimator="reference")
    for z in zs:
        ref.update(z)
    for r in res:
        assert r["exact"] == pytest.approx(list(single.compute()), rel=1e-12)
        assert r["reference"] == pytest.approx(list(ref.compute()), rel=1e-12)
        assert r["mean_of_ranks"] == 0.5
        assert r["rng_restored"]
    assert res[0]["rng_draw"] != res[1]["rng_draw"]  # per-rank RNG states were kept apart


def test_one_estimator_per_channel_report_and_alias() -> None:
    """LatentStats carries the per-channel report; LatentChannelStats is the same estimator."""
    from dmvae.latent_stats import LatentChannelStats

    assert issubclass(LatentChannelStats, LatentStats)
    g = torch.Generator().manual_seed(1)
    grids = [torch.randn(b, 4, 3, 3, generator=g) * torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None, None]
             for b in (2, 5, 1)]  # fmt: skip
    stats, view = LatentStats(), LatentChannelStats()
    for z in grids:
        stats.update(z)
        view.update(z)
    allz = torch.cat(grids).double().transpose(0, 1).reshape(4, -1)  # (C, N)
    report = stats.summary()
    assert report == view.compute()
    assert report["latent_channels"] == 4
    assert report["latent_channel_mean"] == pytest.approx(allz.mean(1).tolist(), rel=1e-12, abs=1e-12)
    assert report["latent_channel_std"] == pytest.approx(allz.std(1).tolist(), rel=1e-12)
    assert report["latent_std"] == pytest.approx(allz.flatten().std().item(), rel=1e-12)
    assert stats.compute() == pytest.approx((report["latent_mean"], report["latent_scale"]), rel=1e-12)
    # tokens (B, N, C) use the last axis as channels
    tok = LatentStats().update(torch.cat(grids).flatten(2).transpose(1, 2))
    assert tok.summary()["latent_channel_std"] == pytest.approx(report["latent_channel_std"], rel=1e-12)


def test_merge_equals_one_pass_and_channel_mismatch_is_an_error() -> None:
    zs = _latents()
    whole = LatentStats()
    for z in zs:
        whole.update(z)
    a, b = LatentStats(), LatentStats()
    for z in zs[:2]:
        a.update(z)
    for z in zs[2:]:
        b.update(z)
    a.merge(b)
    assert a.compute() == pytest.approx(whole.compute(), rel=1e-12)
    for key in ("latent_channel_mean", "latent_channel_std"):
        assert a.summary()[key] == pytest.approx(whole.summary()[key], rel=1e-12, abs=1e-12)
    with pytest.raises(ValueError, match="4 channels"):
        LatentStats().update(torch.zeros(2, 8, 3)).update(torch.zeros(2, 3, 4))
