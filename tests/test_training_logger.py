"""dmvae.training.logger: running means without host syncs, metrics.jsonl, resume truncation, PNG, TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from dmvae.training.logger import MetricLogger, RunningMeans


def test_running_means_average_the_window_and_omit_absent_terms() -> None:
    m = RunningMeans()
    m.add(loss=torch.tensor(1.0), rec=torch.tensor(4.0))
    m.add(loss=torch.tensor(3.0))  # rec not computed this step
    assert m.pop() == {"loss": 2.0, "rec": 4.0}
    assert m.pop() == {}  # reset
    m.add(loss=0.5)
    assert m.pop() == {"loss": 0.5}  # no "rec": nan never appears for a term not computed


def test_metric_logger_files_and_resume(tmp_path: Path) -> None:
    log = MetricLogger(tmp_path, total_steps=6, log_every=2, config={"lr": 1e-3}, progress=True)
    steps = [s for s in range(6) if log.is_log_step(s)]
    assert steps == [1, 3, 5]
    for s in steps:
        log.advance(2)
        rec = log.log(s, {"loss": float(s), "psnr": float("nan")}, lr=0.1)
        assert rec == {"step": s, "loss": float(s), "psnr": None, "lr": 0.1}
    png = log.images(5, "recon", torch.rand(6, 3, 8, 8) * 2 - 1)
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 3, 5] and "nan" not in (tmp_path / "metrics.jsonl").read_text()
    assert all(x["steps_per_s"] > 0 and x["elapsed_s"] >= 0 for x in lines)
    assert json.loads((tmp_path / "args.json").read_text()) == {"lr": 1e-3}
    assert png == tmp_path / "images" / "recon_00000005.png"
    with Image.open(png) as im:
        assert im.mode == "RGB" and im.size == (3 * 8 + 4 * 2, 2 * 8 + 3 * 2)  # 3 x 2 grid, 2 px padding
    # a run resumed from step 2 drops the lines it will write again
    MetricLogger(tmp_path, total_steps=6, start_step=2, progress=False).close()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
    with pytest.raises(ValueError, match="unknown log backend"):
        MetricLogger(tmp_path, total_steps=1, log_to=["mlflow"])
    quiet = MetricLogger(tmp_path / "other", total_steps=1, enabled=False)  # non-main ranks write nothing
    quiet.log(0, {"loss": 1.0})
    assert not (tmp_path / "other").exists()


def test_tensorboard_backend(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    log = MetricLogger(tmp_path, total_steps=2, log_to=["tensorboard"], progress=False)
    log.log(0, {"loss": 1.0})
    log.images(0, "samples", torch.zeros(1, 3, 4, 4))
    log.close()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("loss")] == [1.0] and "samples" in acc.Tags()["images"]
