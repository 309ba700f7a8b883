"""Training helpers that compose into the user's own loop (none of them owns the loop).

- losses: :class:`ReconstructionLoss` (L1 / L2 / LPIPS with a named breakdown)
- gan: PatchGAN discriminator, hinge / non-saturating losses, VQGAN adaptive weight, DiffAugment, bCR
- ema: :class:`EMA` over ``torch.optim.swa_utils.AveragedModel``
- stats: :class:`LatentStats` (latent_mean / latent_scale, exact or reference estimator, DDP-aware)
- schedule: two-time-scale schedule, warm-up, freezing, grad clipping, bf16 autocast
- checkpoint: atomic ``save_checkpoint`` / ``load_checkpoint`` with RNG states and keep-last-N
- data: map-style datasets (:class:`ImageFolder`, :class:`ImageList`, :class:`SkimagePhotos`), the
  reference's transforms; sampler: :class:`TrainLoader` (DataLoader + resumable DistributedSampler);
  webdataset: :class:`~dmvae.training.webdataset.ShardLoader` for tar shards (extra ``shards``)
- distributed: torchrun initialisation (gloo on CPU, nccl on GPU), :func:`wrap_ddp`,
  :class:`GlobalBatchRandom`, small collectives
- logger: :class:`MetricLogger` (metrics.jsonl, TensorBoard / wandb, tqdm, PNG previews), :class:`RunningMeans`

LPIPS itself lives in :mod:`dmvae.lpips` (also used for evaluation).
"""

from dmvae.training.checkpoint import (
    Checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from dmvae.dist import (
    DistInfo,
    GlobalBatchRandom,
    all_reduce_gradients,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    cleanup_distributed,
    get_rank,
    get_world_size,
    init_distributed,
    is_distributed,
    is_main_process,
    local_rows,
    wrap_ddp,
)
from dmvae.ema import EMA
from dmvae.gan import (
    DiffAugment,
    DiscriminatorLossBreakdown,
    NLayerDiscriminator,
    adaptive_generator_weight,
    adopt_weight,
    bcr_loss,
    discriminator_loss,
    gan_active,
    generator_loss,
    hinge_d_loss,
    non_saturating_d_loss,
)
from dmvae.training.data import (
    ImageFolder,
    ImageList,
    SkimagePhotos,
    build_dataset,
    center_crop_transform,
    to_model_input,
    train_transform,
)
from dmvae.training.logger import MetricLogger, RunningMeans
from dmvae.training.sampler import ResumableDistributedSampler, TrainLoader
from dmvae.losses import ReconstructionLoss, ReconstructionLossBreakdown
from dmvae.training.schedule import (
    LinearWarmup,
    TwoTimeScaleSchedule,
    autocast,
    clip_grad_norm,
    freeze,
    linear_warmup,
    set_trainable,
    unfreeze,
)
from dmvae.latent_stats import LatentStats

__all__ = [
    "Checkpoint",
    "DiffAugment",
    "DiscriminatorLossBreakdown",
    "DistInfo",
    "EMA",
    "GlobalBatchRandom",
    "ImageFolder",
    "ImageList",
    "LatentStats",
    "LinearWarmup",
    "MetricLogger",
    "NLayerDiscriminator",
    "ReconstructionLoss",
    "ReconstructionLossBreakdown",
    "ResumableDistributedSampler",
    "RunningMeans",
    "SkimagePhotos",
    "TrainLoader",
    "TwoTimeScaleSchedule",
    "adaptive_generator_weight",
    "adopt_weight",
    "all_reduce_gradients",
    "all_reduce_mean",
    "all_reduce_sum",
    "autocast",
    "barrier",
    "bcr_loss",
    "build_dataset",
    "center_crop_transform",
    "cleanup_distributed",
    "clip_grad_norm",
    "discriminator_loss",
    "freeze",
    "gan_active",
    "generator_loss",
    "get_rank",
    "get_world_size",
    "hinge_d_loss",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "latest_checkpoint",
    "linear_warmup",
    "list_checkpoints",
    "load_checkpoint",
    "local_rows",
    "non_saturating_d_loss",
    "save_checkpoint",
    "set_trainable",
    "to_model_input",
    "train_transform",
    "unfreeze",
    "wrap_ddp",
]
