"""What Table 1 measures, and the gates it checks (written before the run, computed, never forced).

* reconstruction: PSNR and rFD (Fréchet distance in the penultimate features of the independent
  evaluation classifier, :class:`~dmvae.experiments.nets.FeatureClassifier`) of held-out images;
* class structure of held-out latents (:func:`class_structure`): k-NN accuracy (k-NN fitted on
  the training latents), silhouette (Euclidean, by class) and, secondary, a linear probe;
* generation (:func:`generation_metrics`): gFD of decoded samples against the held-out images and
  against the same decoder's reconstructions of them (the second isolates how well the DiT learned
  the latent distribution from how well the decoder draws), and sample accuracy;
* energy distance (:func:`latent_energy`) between flattened held-out latents and reference samples.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from dmvae import DMVAE, sample
from dmvae.experiments.nets import FeatureClassifier, classifier_outputs
from dmvae.experiments.stages import encode_all
from dmvae.metrics import energy_distance, frechet_distance, psnr

__all__ = [
    "GATE_RULES", "class_structure", "compute_gates", "fd", "generation_metrics", "knn_accuracy",
    "latent_energy", "reconstruction_metrics", "summarise",
]


def fd(feats_a: Tensor, feats_b: Tensor) -> float:
    """Fréchet distance between two feature sets (N, F), (M, F)."""
    a, b = feats_a.double(), feats_b.double()
    return frechet_distance(a.mean(0).numpy(), torch.cov(a.T).numpy(), b.mean(0).numpy(), torch.cov(b.T).numpy())


def knn_accuracy(train: Tensor, train_labels: Tensor, held: Tensor, held_labels: Tensor, k: int) -> float:
    """Accuracy of a k-nearest-neighbour vote (Euclidean, flattened) of the training latents on the
    held-out latents; ties go to the lower class id."""
    a, b = train.flatten(1).double(), held.flatten(1).double()
    k = min(k, a.shape[0])
    votes = torch.zeros(b.shape[0], int(train_labels.max()) + 1, dtype=torch.long)
    for start in range(0, b.shape[0], 1000):
        d = torch.cdist(b[start:start + 1000], a)  # (n, N)
        nn_idx = d.topk(k, dim=1, largest=False).indices
        votes[start:start + 1000] = torch.nn.functional.one_hot(train_labels[nn_idx], votes.shape[1]).sum(1)
    return float((votes.argmax(1) == held_labels).double().mean())


def class_structure(train: Tensor, train_labels: Tensor, held: Tensor, held_labels: Tensor, k: int,
                    probe: bool = True) -> dict[str, float]:
    """``knn_acc``, ``silhouette`` (sklearn, Euclidean) and, with ``probe``, ``probe_acc`` (a
    logistic regression on standardised training latents, scored on the held-out ones)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import silhouette_score

    out = {"knn_acc": knn_accuracy(train, train_labels, held, held_labels, k),
           "silhouette": float(silhouette_score(held.flatten(1).double().numpy(), held_labels.numpy()))}
    if probe:
        a, b = train.flatten(1).double(), held.flatten(1).double()
        mu, sd = a.mean(0), a.std(0).clamp_min(1e-8)
        with warnings.catch_warnings():  # a secondary figure: 300 lbfgs iterations, converged or not
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = LogisticRegression(max_iter=300).fit(((a - mu) / sd).numpy(), train_labels.numpy())
        out["probe_acc"] = float(clf.score(((b - mu) / sd).numpy(), held_labels.numpy()))
    return out


def latent_energy(latents: Tensor, reference: Tensor, limit: int = 2000) -> float:
    """Energy distance between flattened latents and reference samples (the first ``limit`` of each)."""
    return energy_distance(latents[:limit].flatten(1).double(), reference[:limit].flatten(1).double())


@torch.no_grad()
def reconstruction_metrics(vae: DMVAE, images: Tensor, labels: Tensor, classifier: FeatureClassifier,
                           held_feats: Tensor) -> tuple[dict[str, float], Tensor]:
    """(``psnr``, ``rfd``, ``recon_accuracy``) of the held-out images and the reconstructions'
    classifier features (N, F) (the reference set of ``gfd_rec``)."""
    z = encode_all(vae, images, normalize=False)
    rec = torch.cat([vae.decode(part, normalize=False) for part in z.split(500)]).clamp(-1, 1)
    logits, feats = classifier_outputs(classifier, rec)
    return {
        "psnr": float(psnr(rec, images).mean()),
        "rfd": fd(feats, held_feats),
        "recon_accuracy": float((logits.argmax(1) == labels).double().mean()),
    }, feats


@torch.no_grad()
def generation_metrics(dit: torch.nn.Module, vae: DMVAE, *, num_classes: int, per_class: int, sampler: str,
                       sampler_steps: int, cfg_scale: float, classifier: FeatureClassifier, held_feats: Tensor,
                       rec_feats: Tensor, seed: int) -> tuple[dict[str, float], Tensor]:
    """Sample ``per_class`` latents of every class from ``dit`` (fixed noise from ``seed``), decode
    with ``vae`` (its current latent statistics), score. Returns (``gfd``, ``gfd_rec``,
    ``sample_accuracy``) and the decoded samples (K per_class, 3, S, S), ordered by class."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    c = vae.config.z_channels
    h = vae.config.image_size // vae.config.patch_size
    noise = torch.randn((labels.numel(), c, h, h), generator=torch.Generator().manual_seed(seed))
    z = sample(dit, noise, labels, num_steps=sampler_steps, method=sampler, cfg_scale=cfg_scale)
    images = torch.cat([vae.decode(part) for part in z.split(500)]).clamp(-1, 1)
    logits, feats = classifier_outputs(classifier, images)
    return {
        "gfd": fd(feats, held_feats),
        "gfd_rec": fd(feats, rec_feats),
        "sample_accuracy": float((logits.argmax(1) == labels).double().mean()),
    }, images


def summarise(values: list[float]) -> dict:
    """``{"mean", "sd" (sample sd, 0 for one value), "values"}`` of one metric over the seeds."""
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "sd": sd, "values": list(values)}


# ---- the gates ---------------------------------------------------------------------------------

GATE_RULES = {
    "reference_more_clustered": "{ref}'s stage-1 held-out latents have a higher k-NN accuracy AND a higher "
                                "silhouette than the AE's stage-1 latents (else the data cannot test the claim)",
    "floor_below_20pct": "the DM update on reference samples (the floor: fake/teacher disagreement alone, "
                         "dmvae.dm_health) is below 20 % of a genuine mismatch's (held-out AE stage-1 latents "
                         "against the same teacher, fake fitted on the AE latents) at the start and the end of stage 3",
    "ed_not_worse_than_stage1": "stage-3 energy distance to p_r <= the same family's stage-1 distance",
    "ed_not_worse_than_control": "SSL λ 10's stage-3 energy distance to p_r <= the SSL λ 0 control's",
    "latent_std_within_10pct": "std of the held-out normalised latents after stage 3 within 10 % of 1",
    "stage4_rfd_within_ae_sd": "every row's stage-4 rFD within one sd (over seeds) of the AE row's rFD",
}


def compute_gates(rows: list[dict]) -> tuple[dict[str, bool], dict[str, dict]]:
    """The gates on means over seeds; returns ({name: passed}, {name: {passed, rule, values}}).
    A gate whose inputs are missing (rows not run) is left out."""
    by = {r["key"]: r["metrics"] for r in rows}

    def m(key: str, metric: str) -> float | None:
        return by.get(key, {}).get(metric, {}).get("mean")

    details: dict[str, dict] = {}

    def gate(name: str, rule: str, passed: bool, **values: float) -> None:
        details[name] = {"passed": bool(passed), "rule": rule, "values": values}

    for ref in ("ssl", "sup"):
        row = "ssl0" if ref == "ssl" and "ssl0" in by else ref
        vals = {"knn_ref": m(row, "knn_acc_s1"), "knn_ae": m("ae", "knn_acc_s1"),
                "silhouette_ref": m(row, "silhouette_s1"), "silhouette_ae": m("ae", "silhouette_s1")}
        if None not in vals.values():
            gate(f"{ref}_reference_more_clustered_than_ae", GATE_RULES["reference_more_clustered"].format(ref=ref),
                 vals["knn_ref"] > vals["knn_ae"] and vals["silhouette_ref"] > vals["silhouette_ae"], **vals)
    for ref in ("ssl", "sup"):
        vals = {"floor_rel_start": m(ref, "dm_floor_rel_start"), "floor_rel_end": m(ref, "dm_floor_rel_end"),
                "genuine_mismatch_rms": m(ref, "genuine_mismatch_rms")}
        if None not in vals.values():
            gate(f"{ref}_floor_below_20pct", GATE_RULES["floor_below_20pct"],
                 max(vals["floor_rel_start"], vals["floor_rel_end"]) < 0.2, **vals)
    for r in rows:
        key = r["key"]
        if r.get("reference", "none") == "none":
            continue
        ed, ed1, std = m(key, "ed"), m(key, "ed_s1"), m(key, "latent_std")
        if ed is not None and ed1 is not None:
            gate(f"{key}_ed_not_worse_than_stage1", GATE_RULES["ed_not_worse_than_stage1"], ed <= ed1,
                 ed_stage3=ed, ed_stage1=ed1)
        if std is not None:
            gate(f"{key}_latent_std_within_10pct", GATE_RULES["latent_std_within_10pct"], abs(std - 1) <= 0.1,
                 latent_std=std)
    if m("ssl", "ed") is not None and m("ssl0", "ed") is not None:
        gate("ssl_ed_not_worse_than_control", GATE_RULES["ed_not_worse_than_control"],
             m("ssl", "ed") <= m("ssl0", "ed"), ed_ssl=m("ssl", "ed"), ed_control=m("ssl0", "ed"))
    if "ae" in by and "rfd" in by["ae"]:
        ae, sd = by["ae"]["rfd"]["mean"], by["ae"]["rfd"]["sd"]
        worst = max(abs(r["metrics"]["rfd"]["mean"] - ae) for r in rows if "rfd" in r["metrics"])
        gate("stage4_rfd_within_ae_sd", GATE_RULES["stage4_rfd_within_ae_sd"], worst <= sd,
             rfd_ae=ae, sd_ae=sd, largest_difference=worst)
    return {k: v["passed"] for k, v in details.items()}, details
