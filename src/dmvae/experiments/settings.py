"""Table 1's settings and rows: ONE set of settings for every row (chosen on the controls, the AE
and SSL λ 0 rows), only λ_DM differing, as the paper (10 for data-derived references, 1 for
synthetic ones and SubSSL). Every field can be changed with ``--set NAME=VALUE``."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, fields, replace

__all__ = ["QUICK", "ROWS", "ROW_KEYS", "Row", "Table1Settings", "stage_seed"]


@dataclass
class Table1Settings:
    """Every knob of the experiment; one value for all rows (λ per reference only)."""

    # ---- data (see dmvae.experiments.data)
    image_size: int = 16  # 28 px Fashion-MNIST resized (antialiased) to 16 px
    train_per_class: int = 1000  # Fashion-MNIST: images per class for the autoencoders and DiTs
    held_per_class: int = 200  # Fashion-MNIST: held-out images per class, from the test file
    holdout_fraction: float = 0.2  # digits / class folders: stratified held-out fraction
    split_seed: int = 0  # every split is fixed by this seed, the same for every run seed
    sub_fraction: float = 0.3  # SubSSL's reference keeps the first round(0.3 K) classes
    # ---- autoencoder: the dmvae-tiny preset (96-d 2-block ViT, bottleneck 128) with these fields
    patch_size: int = 4  # 16 px / 4 = a 4x4 latent grid
    z_channels: int = 8  # latent (8, 4, 4) = 128 numbers per image
    decoder_channels: int = 32
    decoder_channel_mult: tuple[int, ...] = (1, 1)  # 2 upsampling levels (x4 = the patch size)
    decoder_num_res_blocks: int = 0  # 1 ResBlock per level (Flux counts +1)
    # ---- autoencoder optimisation: AdamW (0.9, 0.999), no weight decay, L1; every stage a 5 %
    # linear warm-up then cosine decay to 0
    batch_size: int = 32
    stage1_steps: int = 1200  # per family (AE; SSL and Supervised with the encoder frozen), shared by all seeds
    stage1_lr: float = 2e-3
    stage3_steps: int = 150  # autoencoder steps of stage 3 (encoder unfrozen); the fake takes fake_every x as many
    stage3_lr: float = 1e-4  # 3e-4 moved q off p_r faster than the fake can follow (pilots in the docs)
    fake_every: int = 4  # two time-scales: the fake steps 4x per autoencoder step ...
    fake_lr: float = 2e-5  # ... at 1/5 of the autoencoder's lr (AdamW (0.9, 0.95)); 1e-4 let the fake drift
    # from the teacher (floor 0.46 vs 0.09 of the teacher's denoising error after 600 steps, see the docs)
    fake_weight_decay: float = 0.0
    stage4_steps: int = 300  # decoder-only fine-tune (paper B.4), every row
    stage4_lr: float = 3e-4
    # ---- the DM loss (stage 3): CFG on teacher and fake (class-conditional references only)
    dm_cfg: float = 3.0  # the paper's best rows use 3-5 inside the loss; 1 = off
    dm_t_min: float = 0.0  # t ~ U[dm_t_min, dm_t_max], library convention (t = 1 data)
    dm_t_max: float = 1.0
    lambda_gaussian: float = 1.0  # λ_DM per reference (paper: 1 synthetic, 10 data-derived)
    lambda_gmm: float = 1.0
    lambda_ssl: float = 10.0
    lambda_sup: float = 10.0
    lambda_subssl: float = 1.0
    # ---- every LatentDiT (teachers, fakes, downstream): patch 1, RMSNorm / SwiGLU / RoPE, AdamW
    # (0.9, 0.95), grad clip 1, uniform t; class-conditional ones drop the label 10 % of the time
    dit_hidden: int = 64
    dit_depth: int = 3
    dit_heads: int = 4
    teacher_steps: int = 1000  # stage 2: teachers of SSL / Supervised / SubSSL, the AE fake init
    teacher_lr: float = 2e-3
    teacher_schedule: str = "cosine"  # decay to 0: a converged teacher the fake copy does not walk away from
    dit_budgets: tuple[int, ...] = (150, 300, 600, 1200)  # downstream steps at which gFD is measured
    dit_lr: float = 2e-3
    dit_batch: int = 64
    dit_ema: float = 0.999  # downstream EMA decay (with warm-up where dmvae.ema.EMA has it)
    # ---- pretrained encoders (SSL / Supervised) and the evaluation classifier, on the pretraining set
    ssl_steps: int = 1500  # k-NN of the SSL features rose with the budget: 0.828 (300 steps), 0.838 (1,000)
    ssl_batch: int = 128
    ssl_lr: float = 1e-3
    ssl_temperature: float = 0.2
    ssl_min_scale: float = 0.35  # random resized crop: 35-100 % of the area
    sup_steps: int = 600
    classifier_steps: int = 800
    classifier_features: int = 64  # width of the penultimate layer = the rFD / gFD space
    # ---- generation and metrics
    samples_per_class: int = 50
    sampler: str = "heun"
    sampler_steps: int = 10
    cfg_scale: float = 1.0  # guidance of the downstream sampler (1 = off, as the paper's Table 3)
    reference_samples: int = 2000  # samples of analytic references for the energy distance
    knn_k: int = 10
    health_batch: int = 256  # fixed batch of the stage-3 health figures
    tsne_points: int = 1000  # held-out latents per row in latents.png (first seed)

    def __post_init__(self) -> None:
        if isinstance(self.decoder_channel_mult, list):
            self.decoder_channel_mult = tuple(self.decoder_channel_mult)
        if isinstance(self.dit_budgets, list):
            self.dit_budgets = tuple(self.dit_budgets)
        budgets = self.dit_budgets
        if len(budgets) < 2 or any(b < 1 for b in budgets) or list(budgets) != sorted(set(budgets)):
            raise ValueError(f"dit_budgets must be >= 2 increasing positive step counts, got {budgets}")
        for name in ("stage1_steps", "stage3_steps", "stage4_steps", "teacher_steps", "ssl_steps", "sup_steps",
                     "classifier_steps", "fake_every", "samples_per_class", "sampler_steps", "knn_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.teacher_schedule not in ("constant", "cosine"):
            raise ValueError(f"teacher_schedule must be 'constant' or 'cosine', got {self.teacher_schedule!r}")
        if not 0.0 <= self.dm_t_min <= self.dm_t_max <= 1.0:
            raise ValueError(f"need 0 <= dm_t_min <= dm_t_max <= 1, got {self.dm_t_min}, {self.dm_t_max}")

    def dm_weight(self, reference: str | None) -> float:
        return 0.0 if reference is None else float(getattr(self, f"lambda_{reference}"))

    def with_overrides(self, assignments: list[str]) -> Table1Settings:
        """A copy with ``"name=value"`` assignments applied (value parsed as the field's type;
        tuples as comma-separated ints)."""
        known = {f.name: f for f in fields(self)}
        changes: dict[str, object] = {}
        for item in assignments:
            name, sep, text = item.partition("=")
            if not sep or name not in known:
                raise ValueError(f"--set expects NAME=VALUE with NAME one of {sorted(known)}, got {item!r}")
            current = getattr(self, name)
            try:
                if isinstance(current, tuple):
                    changes[name] = tuple(int(v) for v in text.split(","))
                elif isinstance(current, bool):
                    changes[name] = {"true": True, "1": True, "false": False, "0": False}[text.lower()]
                else:
                    changes[name] = type(current)(text)
            except (ValueError, KeyError):
                raise ValueError(f"--set {name}: cannot read {text!r} as {type(current).__name__}") from None
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


# --quick: the same pipeline with smoke budgets (shapes, files, finiteness; NOT expected to pass the gates)
QUICK = {
    "train_per_class": 100, "held_per_class": 40, "stage1_steps": 40, "stage3_steps": 6, "stage4_steps": 10,
    "teacher_steps": 30, "dit_budgets": (15, 30), "ssl_steps": 15, "ssl_batch": 64, "sup_steps": 15, "classifier_steps": 60,
    "samples_per_class": 6, "sampler_steps": 4, "reference_samples": 300, "health_batch": 64, "tsne_points": 300,
}


@dataclass(frozen=True)
class Row:
    key: str
    name: str
    family: str  # which stage-1 model it starts from: "ae", "ssl" or "sup"
    reference: str | None  # "gaussian", "gmm", "ssl", "sup", "subssl"; None = no DM term (λ 0)
    description: str

    @property
    def measured_against(self) -> str:
        """The reference its latents are compared with: its own, or its family's (λ 0 rows)."""
        return self.reference or ("gaussian" if self.family == "ae" else self.family)

    @property
    def conditional(self) -> bool:
        """Class-conditional DM term: the reference carries the classes (SSL, Supervised)."""
        return self.reference in ("ssl", "sup")


ROWS: tuple[Row, ...] = (
    Row("ae", "AE (λ 0)", "ae", None, "no distribution constraint (the VAE-baseline role)"),
    Row("gaussian", "Gaussian", "ae", "gaussian", "N(0, I) on the normalised latents"),
    Row("gmm", "GMM-10", "ae", "gmm", "10-component Gaussian mixture (means ~ N(0, I), std 0.5)"),
    Row("ssl0", "SSL λ 0 (control)", "ssl", None, "the SSL stage 1 and every later stage, without the DM term"),
    Row("ssl", "SSL", "ssl", "ssl", "class-conditional LatentDiT on the latents of a frozen SimCLR encoder"),
    Row("sup", "Supervised", "sup", "sup", "the same with an encoder trained as a classifier (positive control)"),
    Row("subssl", "SubSSL", "ssl", "subssl", "unconditional LatentDiT on the SSL latents of 3 of 10 classes"),
)
ROW_KEYS = tuple(r.key for r in ROWS)


def stage_seed(seed: int, tag: str) -> int:
    """A reproducible seed per (run seed, stage): rows sharing a stage share its draws."""
    return (seed * 1_000_003 + zlib.crc32(tag.encode())) % 2**31
