"""The paper's Table 1 and Fig. 6 in miniature, on real images: which reference distribution makes
the latents easiest for a diffusion model to learn (arXiv 2512.07778, Sec. 4.1; App. B).

Rows (:data:`~dmvae.experiments.settings.ROWS`): AE (λ 0), Gaussian (1), GMM-10 (1), SSL λ 0
(the control), SSL (10), Supervised (10, the positive control), SubSSL (1). Stages:

1. per encoder family, trained ONCE and shared by all seeds: the AE from scratch; SSL and
   Supervised with a pretrained encoder (SimCLR / classifier on the whole pretraining set) frozen;
2. references, shared by all seeds: N(0, I), a GMM, or a LatentDiT fitted on the family's stage-1
   latents (class-conditional for SSL and Supervised, unconditional on 3 classes for SubSSL); the
   fake score starts as a copy of the teacher (SSL, Supervised, SubSSL: q = p_r at the start) or
   as a LatentDiT fitted on the AE latents (Gaussian, GMM);
3. per seed: the joint DM loop (:func:`~dmvae.experiments.stages.train_dm_stage`), its health
   figures at the start and the end;
4. per seed: decoder-only fine-tune, then the class-conditional downstream LatentDiT, scored at
   every budget of ``dit_budgets``.

Run it with ``python benchmarks/table1.py`` (``--help`` for the options).
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from dmvae import DMVAE, DistributionMatchingLoss, create_prior
from dmvae.dm_health import DMHealth
from dmvae.experiments.data import DataBundle, ImageSet, load_data
from dmvae.experiments.measures import (
    class_structure,
    compute_gates,
    fd,
    generation_metrics,
    latent_energy,
    reconstruction_metrics,
    summarise,
)
from dmvae.experiments.nets import (
    FeatureClassifier,
    classifier_outputs,
    pretrain_ssl_encoder,
    pretrain_supervised_encoder,
    seeded,
    train_classifier,
)
from dmvae.experiments.settings import ROW_KEYS, ROWS, Row, Table1Settings, stage_seed
from dmvae.experiments.stages import (
    autoencoder_config,
    encode_all,
    fit_teacher,
    measure_latent_stats,
    train_autoencoder,
    train_dm_stage,
    train_downstream,
)

__all__ = ["Shared", "merge_results", "prepare_shared", "run_seed", "run_table1"]


def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


class _Clock:
    """Seconds per named stage, summed (the stage-cost table of the docs)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        dt, self._t = now - self._t, now
        self.seconds[name] = self.seconds.get(name, 0.0) + dt
        return dt


# ################################################################################################
#                                 shared stages (once for all seeds)
# ################################################################################################


class Shared:
    """Everything trained once: data, evaluation classifier, stage 1 per family, references."""

    def __init__(self, s: Table1Settings, data: DataBundle) -> None:
        self.s, self.data = s, data
        self.classifier: FeatureClassifier | None = None
        self.held_feats = torch.empty(0)
        self.stage1: dict[str, DMVAE] = {}
        self.bank: dict[str, Tensor] = {}  # stage-1 normalised training latents per family
        self.held1: dict[str, Tensor] = {}  # stage-1 normalised held-out latents per family
        self.metrics1: dict[str, dict[str, float]] = {}  # stage-1 figures per family
        self.teachers: dict[str, nn.Module] = {}
        self.fake_init: dict[str, nn.Module] = {}
        self.ref_samples: dict[str, Tensor] = {}
        self.health_idx = torch.empty(0, dtype=torch.long)  # a fixed batch of training images
        self.genuine: dict[str, float] = {}  # DM gradient of a genuine mismatch per teacher
        self.classifier_info: dict[str, object] = {}


def _stage1(s: Table1Settings, family: str, data: DataBundle) -> DMVAE:
    with seeded(stage_seed(0, f"init-{family}")):
        vae = DMVAE(autoencoder_config(s))
        donor = DMVAE(autoencoder_config(s)).encoder
    if family != "ae":  # pretrain the encoder on the pretraining set, freeze it: the DINOv2 role (B.1)
        pre = data.pretrain
        if family == "ssl":
            enc = pretrain_ssl_encoder(donor, pre.images, steps=s.ssl_steps, batch_size=s.ssl_batch, lr=s.ssl_lr,
                                       temperature=s.ssl_temperature, min_scale=s.ssl_min_scale,
                                       seed=stage_seed(0, "ssl"))
        else:
            enc = pretrain_supervised_encoder(donor, pre.images, pre.labels, pre.num_classes, steps=s.sup_steps,
                                              batch_size=s.ssl_batch, lr=s.ssl_lr, seed=stage_seed(0, "sup"))
        vae.encoder.load_state_dict(enc.state_dict())
        vae.freeze_encoder()
    train_autoencoder(vae, data.train.images, steps=s.stage1_steps, lr=s.stage1_lr, batch_size=s.batch_size,
                      seed=stage_seed(0, "stage1"))
    vae.freeze_encoder(False)
    measure_latent_stats(vae, data.train.images)
    return vae


def prepare_shared(s: Table1Settings, rows: list[Row], data: DataBundle, clock: _Clock, quiet: bool) -> Shared:
    sh = Shared(s, data)
    train, held = data.train, data.held
    k = train.num_classes
    sh.classifier = train_classifier(data.pretrain.images, data.pretrain.labels, k, steps=s.classifier_steps,
                                     feature_dim=s.classifier_features, seed=stage_seed(0, "classifier"))
    held_logits, sh.held_feats = classifier_outputs(sh.classifier, held.images)
    _, train_feats = classifier_outputs(sh.classifier, train.images)
    sh.classifier_info = {
        "architecture": "3 conv (32, 64/2, 64/2) + FC; features = ReLU(FC) penultimate layer",
        "feature_layer": f"penultimate (ReLU of the first fully connected layer, {s.classifier_features}-d)",
        "trained_on": f"{len(data.pretrain)} pretraining images",
        "held_out_accuracy": float((held_logits.argmax(1) == held.labels).double().mean()),
        "fd_train_vs_held_out": fd(train_feats, sh.held_feats),  # floor: real vs real images
    }
    _log(quiet, f"classifier: held-out accuracy {sh.classifier_info['held_out_accuracy']:.3f} "
                f"({clock.lap('classifier'):.0f} s)")
    families = ["ae"] + [f for f in ("ssl", "sup") if any(r.family == f for r in rows)]
    for family in families:
        sh.stage1[family] = _stage1(s, family, data)
        sh.bank[family] = encode_all(sh.stage1[family], train.images)
        sh.held1[family] = encode_all(sh.stage1[family], held.images)
        rec, _ = reconstruction_metrics(sh.stage1[family], held.images, held.labels, sh.classifier, sh.held_feats)
        cs = class_structure(sh.bank[family], train.labels, sh.held1[family], held.labels, s.knn_k)
        sh.metrics1[family] = {f"{name}_s1": v for name, v in {**rec, **cs}.items()}
        _log(quiet, f"stage 1 [{family}]: " + ", ".join(f"{n} {v:.3f}" for n, v in sh.metrics1[family].items())
             + f" ({clock.lap(f'stage1_{family}'):.0f} s)")
    shape = tuple(sh.bank["ae"].shape[1:])  # (C, h, w)

    # ---- references p_r (velocity model + samples for the energy distance) and fake inits
    g = torch.Generator().manual_seed(stage_seed(0, "reference-samples"))
    sub = torch.arange(max(1, round(s.sub_fraction * k)))
    in_sub = torch.isin(train.labels, sub)
    wanted = {r.measured_against for r in rows} | {"gaussian"}
    wanted |= {"ssl"} if any(r.family == "ssl" and r.reference for r in rows) else set()
    for ref in sorted(wanted):
        if ref in ("gaussian", "gmm"):
            prior = (create_prior("gaussian", shape=shape) if ref == "gaussian"
                     else create_prior("gmm", shape=shape, num_components=10, seed=stage_seed(0, "gmm")))
            sh.teachers[ref] = prior
            sh.ref_samples[ref] = prior.sample(s.reference_samples, generator=g)
            continue
        lat = sh.bank["ssl" if ref == "subssl" else ref]
        lab = train.labels
        if ref == "subssl":
            lat, lab = lat[in_sub], lab[in_sub]
        order = torch.randperm(lat.shape[0], generator=g)
        sh.ref_samples[ref] = lat[order]  # the teacher's own training latents, shuffled
        sh.teachers[ref] = fit_teacher(s, lat, None if ref == "subssl" else lab, k, stage_seed(0, f"teacher-{ref}"))
        _log(quiet, f"teacher [{ref}] ({clock.lap(f'teacher_{ref}'):.0f} s)")
    if any(r.family == "ae" and r.reference for r in rows) or any(r.conditional for r in rows):
        sh.fake_init["ae"] = fit_teacher(s, sh.bank["ae"], None, k, stage_seed(0, "fake-ae"))
        _log(quiet, f"fake init [ae] ({clock.lap('fake_init_ae'):.0f} s)")
    for family in ("ssl", "sup"):
        if family in sh.teachers:
            sh.fake_init[family] = sh.teachers[family]  # the paper: fake := teacher (q = p_r at the start)
    sh.health_idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(s.split_seed))[:s.health_batch]
    n = sh.health_idx.numel()
    for ref in ("ssl", "sup"):
        if ref in sh.teachers and "ae" in sh.fake_init:  # AE latents against this teacher: a genuine mismatch
            dm = DistributionMatchingLoss(sh.teachers[ref], sh.fake_init["ae"], cfg_scale=s.dm_cfg,
                                          t_range=(s.dm_t_min, s.dm_t_max))
            sh.genuine[ref] = DMHealth(dm, seed=stage_seed(0, "health")).gradient_rms(
                sh.held1["ae"][:n], held.labels[:n])
    clock.lap("references_other")
    return sh


# ################################################################################################
#                                        one seed, all rows
# ################################################################################################


def _run_row(sh: Shared, row: Row, seed: int, clock: _Clock) -> tuple[dict[str, float], Tensor, Tensor]:
    """Stages 3, 4 and the downstream DiT of one row; (metrics, samples at the last budget,
    held-out latents after stage 3)."""
    s, train, held = sh.s, sh.data.train, sh.data.held
    k = train.num_classes
    weight = s.dm_weight(row.reference)
    vae = copy.deepcopy(sh.stage1[row.family])
    metrics: dict[str, float] = dict(sh.metrics1[row.family])
    dm = None
    if weight > 0:
        dm = DistributionMatchingLoss(sh.teachers[row.reference], copy.deepcopy(sh.fake_init[row.family]),
                                      cfg_scale=s.dm_cfg if row.conditional else 1.0,
                                      t_range=(s.dm_t_min, s.dm_t_max))
    hidx = sh.health_idx
    hx, hy = train.images[hidx], (train.labels[hidx] if row.conditional else None)
    held_y = held.labels[: hidx.numel()] if row.conditional else None
    health = None
    if dm is not None:  # the health figures of dmvae.dm_health, on fixed batches
        own = row.reference == row.family  # SSL / Supervised: q = p_r at the start, fake = teacher
        ref_batch = sh.bank[row.family][hidx] if own else sh.ref_samples[row.reference][: hidx.numel()]
        health = DMHealth(dm, stage1=sh.held1[row.family][: hidx.numel()], stage1_train=sh.bank[row.family][hidx],
                          labels=held_y, train_labels=hy, reference=ref_batch, reference_labels=hy if own else None,
                          fake_matches_teacher=own, mismatch_rms=sh.genuine.get(row.reference) if own else None,
                          seed=stage_seed(seed, "health"), prefix="")

    def measure_health(when: str) -> None:
        if health is None:
            return
        figures = health.measure(encode_all(vae, held.images[: hidx.numel()]), encode_all(vae, hx))
        metrics.update({f"{name}_{when}": v for name, v in figures.items()})
        metrics[f"health_warnings_{when}"] = float(len(health.warnings(figures)))

    train_dm_stage(vae, train.images, train.labels, s=s, seed=stage_seed(seed, "stage3"), dm=dm, dm_weight=weight,
                   conditional=row.conditional, on_start=lambda: measure_health("start"))
    measure_health("end")
    if row.reference in sh.genuine:
        metrics["genuine_mismatch_rms"] = sh.genuine[row.reference]
    clock.lap("stage3")
    rec3, _ = reconstruction_metrics(vae, held.images, held.labels, sh.classifier, sh.held_feats)
    metrics.update({f"{n}_s3": v for n, v in rec3.items()})
    held3 = encode_all(vae, held.images)  # stage-1 statistics: the space the DM term acts in
    metrics.update(class_structure(encode_all(vae, train.images), train.labels, held3, held.labels, s.knn_k))
    ref = sh.ref_samples[row.measured_against]
    metrics["ed"] = latent_energy(held3, ref)
    metrics["ed_s1"] = latent_energy(sh.held1[row.family], ref)
    metrics["latent_std"], metrics["latent_mean"] = float(held3.std()), float(held3.mean())
    clock.lap("stage3_metrics")

    train_autoencoder(vae, train.images, steps=s.stage4_steps, lr=s.stage4_lr, batch_size=s.batch_size,
                      seed=stage_seed(seed, "stage4"), part="decoder")
    rec4, rec_feats = reconstruction_metrics(vae, held.images, held.labels, sh.classifier, sh.held_feats)
    metrics.update(rec4)
    clock.lap("stage4")

    measure_latent_stats(vae, train.images)  # every tokenizer gets its own normalisation (B.5)
    latents = encode_all(vae, train.images)
    samples: list[Tensor] = []
    eval_seconds = [0.0]

    def at_budget(step: int, dit: nn.Module) -> None:
        t0 = time.perf_counter()
        gen, images = generation_metrics(
            dit, vae, num_classes=k, per_class=s.samples_per_class, sampler=s.sampler,
            sampler_steps=s.sampler_steps, cfg_scale=s.cfg_scale, classifier=sh.classifier,
            held_feats=sh.held_feats, rec_feats=rec_feats, seed=stage_seed(seed, "sampling"))
        metrics.update({f"{n}_{step}": v for n, v in gen.items()})
        samples[:] = [images]
        eval_seconds[0] += time.perf_counter() - t0

    train_downstream(s, latents, train.labels, k, stage_seed(seed, "downstream"), at_budget)
    last = max(s.dit_budgets)
    metrics.update(gfd=metrics[f"gfd_{last}"], gfd_rec=metrics[f"gfd_rec_{last}"],
                   sample_accuracy=metrics[f"sample_accuracy_{last}"])
    clock.lap("downstream")
    clock.seconds["downstream"] -= eval_seconds[0]  # training alone; the sampling and scoring:
    clock.seconds["downstream_eval"] = clock.seconds.get("downstream_eval", 0.0) + eval_seconds[0]
    return metrics, samples[0], held3


def run_seed(sh: Shared, rows: list[Row], seed: int, clock: _Clock, quiet: bool = False,
             ) -> tuple[dict[str, dict[str, float]], dict[str, Tensor], dict[str, Tensor]]:
    """All requested rows for one seed: ({row: metrics}, {row: samples}, {row: held-out latents})."""
    results, samples, latents = {}, {}, {}
    for row in rows:
        t0 = time.perf_counter()
        results[row.key], samples[row.key], latents[row.key] = _run_row(sh, row, seed, clock)
        m = results[row.key]
        _log(quiet, f"  {row.name}: psnr {m['psnr']:.2f}, rfd {m['rfd']:.2f}, knn {m['knn_acc']:.3f}, "
                    f"gfd {m['gfd']:.2f}, gfd_rec {m['gfd_rec']:.2f}, acc {m['sample_accuracy']:.3f}, "
                    f"ed {m['ed']:.3f} (stage 1 {m['ed_s1']:.3f}), std {m['latent_std']:.3f} "
                    f"({time.perf_counter() - t0:.0f} s)")
    return results, samples, latents


# ################################################################################################
#                                            driver
# ################################################################################################


def _curve(metrics: dict[str, dict], budgets: list[int], name: str = "gfd") -> list[dict]:
    return [{"steps": int(n), "mean": metrics[f"{name}_{n}"]["mean"], "sd": metrics[f"{name}_{n}"]["sd"]}
            for n in budgets if f"{name}_{n}" in metrics]


def _rows_out(chosen: list[Row], per_seed: dict[int, dict], s_dict: dict) -> list[dict]:
    seeds = sorted(per_seed)
    out = []
    for row in chosen:
        keys = list(per_seed[seeds[0]][row.key])
        metrics = {k: summarise([per_seed[sd][row.key][k] for sd in seeds]) for k in keys}
        out.append(_row_entry(row.key, row.name, row.reference, row.description, row.family,
                              float(s_dict[f"lambda_{row.reference}"]) if row.reference else 0.0,
                              metrics, s_dict["dit_budgets"]))
    return out


def _row_entry(key: str, name: str, reference: str | None, description: str, family: str, weight: float,
               metrics: dict, budgets: list[int]) -> dict:
    return {"key": key, "name": name, "reference": reference or "none", "reference_description": description,
            "dm_weight": weight, "stage1": family, "metrics": metrics,
            "gfd_curve": _curve(metrics, budgets), "gfd_rec_curve": _curve(metrics, budgets, "gfd_rec")}


def run_table1(
    settings: Table1Settings, *, data: str | None = None, seeds: list[int] | tuple[int, ...] = (0, 1, 2),
    rows: list[str] | tuple[str, ...] = ROW_KEYS, quiet: bool = False,
    on_seed: Callable[[int, dict], None] | None = None,
) -> dict:
    """Run the experiment; returns the result dict written to ``table1.json``, plus (keys starting
    with ``_``) the first seed's samples, held-out latents and real held-out images for the
    pictures. The caller's RNG state is left untouched."""
    unknown = [r for r in rows if r not in ROW_KEYS]
    if unknown or not rows:
        raise ValueError(f"unknown rows {unknown}; choose from {list(ROW_KEYS)}")
    chosen = [r for r in ROWS if r.key in rows]
    s = settings
    clock = _Clock()
    t_start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        bundle = load_data(data, image_size=s.image_size, train_per_class=s.train_per_class,
                           held_per_class=s.held_per_class, holdout_fraction=s.holdout_fraction,
                           split_seed=s.split_seed)
        train, held = bundle.train, bundle.held
        _log(quiet, f"data: {bundle.source}, {len(train)} train / {len(held)} held-out / {len(bundle.pretrain)} "
                    f"pretraining images, {train.num_classes} classes, {s.image_size} px ({clock.lap('data'):.0f} s)")
        sh = prepare_shared(s, chosen, bundle, clock, quiet)
        per_seed: dict[int, dict] = {}
        first: tuple[dict, dict] = ({}, {})
        for seed in seeds:
            t0 = time.perf_counter()
            _log(quiet, f"seed {seed}")
            res, samples, latents = run_seed(sh, chosen, seed, clock, quiet)
            per_seed[seed] = res
            if not first[0]:
                first = (samples, latents)
            _log(quiet, f"seed {seed} done in {time.perf_counter() - t0:.0f} s")
            if on_seed is not None:
                on_seed(seed, res)
    out_rows = _rows_out(chosen, per_seed, s.to_dict())
    gates, gate_details = compute_gates(out_rows)
    n_tsne = min(s.tsne_points, len(held))
    return {
        "experiment": "dmvae table1 (paper Table 1 / Fig. 6 in miniature)",
        "data": {"source": bundle.source, "num_classes": train.num_classes, "classes": train.class_names,
                 "train_images": len(train), "held_out_images": len(held), "pretrain_images": len(bundle.pretrain),
                 "image_size": s.image_size,
                 "sub_classes": [train.class_names[i] for i in range(max(1, round(s.sub_fraction * train.num_classes)))]},
        "settings": s.to_dict(),
        "two_time_scales": {"fake_steps_per_autoencoder_step": s.fake_every,
                            "fake_lr_over_autoencoder_lr": s.fake_lr / s.stage3_lr},
        "seeds": list(seeds),
        "classifier": sh.classifier_info,
        "rows": out_rows,
        "gates": gates,
        "gate_details": gate_details,
        "stage_seconds": {k: round(v, 1) for k, v in clock.seconds.items()},
        "wall_seconds": time.perf_counter() - t_start,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "_samples": first[0],
        "_latents": {k: v[:n_tsne] for k, v in first[1].items()},
        "_latent_labels": held.labels[:n_tsne],
        "_real": _real_grid(held, 2),
    }


def merge_results(results: list[dict]) -> dict:
    """Combine ``table1.json`` results of runs over different seeds (e.g. run in parallel with
    ``--first-seed``) into one: the settings, data and rows must be identical and the seeds
    disjoint. Per-seed values are concatenated (in seed order) and summarised again, the gates
    recomputed; the wall time is the longest run's, ``wall_seconds_total`` their sum."""
    if not results:
        raise ValueError("nothing to merge")
    first = results[0]
    for r in results[1:]:
        for key in ("settings", "data", "classifier"):
            if r[key] != first[key]:
                raise ValueError(f"cannot merge runs with different {key!r}")
        if [x["key"] for x in r["rows"]] != [x["key"] for x in first["rows"]]:
            raise ValueError("cannot merge runs with different rows")
    seeds = [sd for r in results for sd in r["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"the runs share seeds: {seeds}")
    order = sorted(range(len(seeds)), key=seeds.__getitem__)
    budgets = first["settings"].get("dit_budgets", [])
    rows = []
    for i, row in enumerate(first["rows"]):
        metrics = {}
        for k in row["metrics"]:
            vals = [v for r in results for v in r["rows"][i]["metrics"][k]["values"]]
            metrics[k] = summarise([vals[j] for j in order])
        rows.append({**row, "metrics": metrics, "gfd_curve": _curve(metrics, budgets),
                     "gfd_rec_curve": _curve(metrics, budgets, "gfd_rec")})
    gates, details = compute_gates(rows)
    merged = {k: v for k, v in first.items() if k not in ("rows", "seeds", "gates", "gate_details")}
    merged.update(rows=rows, seeds=sorted(seeds), gates=gates, gate_details=details,
                  wall_seconds=max(r["wall_seconds"] for r in results),
                  wall_seconds_total=sum(r["wall_seconds"] for r in results))
    return merged


def _real_grid(held: ImageSet, per_class: int) -> Tensor:
    picks = [torch.nonzero(held.labels == c).flatten()[:per_class] for c in range(held.num_classes)]
    return held.images[torch.cat(picks)]

