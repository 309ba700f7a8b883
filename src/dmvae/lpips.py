"""LPIPS-VGG perceptual distance (Zhang et al. 2018), used by training and evaluation.

The network is the VGG16 trunk cut at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3, plus one
non-negative 1x1 "linear head" per cut. For two images in [-1, 1]:

    d(x, y) = sum_k mean_hw( lin_k( (f_k(x)/|f_k(x)| - f_k(y)/|f_k(y)|)^2 ) )

where f_k are the trunk features after the fixed scaling layer (shift (-.030, -.088, -.188),
scale (.458, .448, .450)) and |.| is the per-pixel channel norm (+1e-10). This matches the `lpips`
package (``lpips.LPIPS(net="vgg")``, version 0.1) and the VGG LPIPS used by taming/VQGAN and the
DMVAE reference; ``forward`` returns one distance per sample, the reference's training loss is its
``.mean()``.

Weights (nothing is ever downloaded at run time)
-----------------------------------------------
The module's state-dict layout is the `lpips` package's: ``net.slice{1..5}.{i}.{weight,bias}`` for the
VGG16 convolutions (``i`` = the index in ``torchvision.models.vgg16().features``) and
``lin{0..4}.model.1.weight`` for the heads (shapes [1, C, 1, 1], C = 64, 128, 256, 512, 512). Files
may also use torchvision's ``features.{i}.*`` names (the ``vgg16-397923af.pth`` download; its
``classifier.*`` keys are ignored) and may hold the trunk and the heads in separate files.

Where the weights come from, in order:

1. ``weights=``: a local ``.safetensors`` / ``.pt`` / ``.pth`` file (read with
   ``torch.load(weights_only=True)``), a list of such files, a state dict, or ``"hf://owner/repo/file"``
   (``huggingface_hub.hf_hub_download``; honours ``HF_HUB_OFFLINE`` and the HF cache);
2. the ``DMVAE_LPIPS_WEIGHTS`` environment variable (same forms, ``os.pathsep``-separated);
3. for whatever is still missing: the trunk from torchvision's cache
   (``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``), the heads from the `lpips` wheel
   (``lpips/weights/v0.1/vgg.pth``, shipped with ``pip install lpips``).

If any key is still missing, :class:`LPIPSWeightsError` says which group (trunk or heads) and how to
provide it. ``pretrained=False`` gives random weights (tests only: the values mean nothing).

To make a single self-contained file on a machine with internet access::

    import torch, torchvision
    from safetensors.torch import save_file
    from dmvae.lpips import LPIPS
    vgg = torchvision.models.vgg16(weights="IMAGENET1K_V1").state_dict()
    m = LPIPS(weights=[vgg])            # heads from the lpips wheel
    save_file(m.state_dict(), "lpips_vgg.safetensors")
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Union

import torch
from torch import Tensor, nn

from dmvae.layers import FrozenModule

__all__ = ["LPIPS", "LPIPSWeightsError", "convert_lpips_state_dict", "VGG_LPIPS_CHANNELS"]

# VGG16 conv layout: channels per conv, "M" = 2x2 max-pool (torchvision `cfgs["D"]`).
_VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
)  # fmt: skip
# `features` indices where each LPIPS slice ends (exclusive): relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_SLICE_ENDS = (4, 9, 16, 23, 30)
VGG_LPIPS_CHANNELS = (64, 128, 256, 512, 512)
TORCHVISION_VGG16_FILE = "vgg16-397923af.pth"
ENV_VAR = "DMVAE_LPIPS_WEIGHTS"

WeightsSource = Union[str, os.PathLike, Mapping[str, Tensor]]


class LPIPSWeightsError(FileNotFoundError):
    """The LPIPS trunk or head weights could not be found or do not fit."""


def _build_vgg16_features() -> list[nn.Module]:
    layers: list[nn.Module] = []
    in_ch = 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_ch, int(v), 3, padding=1), nn.ReLU()]
            in_ch = int(v)
    return layers  # indices match torchvision's vgg16().features[:30]


class _VGGSlices(nn.Module):
    """VGG16 trunk cut into five slices; module names keep torchvision's feature indices."""

    def __init__(self) -> None:
        super().__init__()
        feats = _build_vgg16_features()
        start = 0
        for k, end in enumerate(_SLICE_ENDS, start=1):
            s = nn.Sequential()
            for i in range(start, end):
                s.add_module(str(i), feats[i])
            self.add_module(f"slice{k}", s)
            start = end

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for k in range(1, 6):
            x = getattr(self, f"slice{k}")(x)
            outs.append(x)
        return outs


class _LinHead(nn.Module):
    """1x1 conv C->1 without bias. Index 0 is a placeholder (lpips has Dropout there; we keep
    Identity so LPIPS is deterministic even if a parent module is put in train mode)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def convert_lpips_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map torchvision / lpips-package / taming key names onto :class:`LPIPS` names.

    ``features.{i}.*`` (torchvision vgg16) -> ``net.slice{k}.{i}.*``; ``lins.{k}.*`` (the lpips
    package's duplicate alias of ``lin{k}``), ``scaling_layer.*`` (constants) and ``classifier.*``
    (torchvision's FC head) are dropped. Other keys are kept, so unknown ones still fail loading.
    """
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key.startswith(("lins.", "scaling_layer.", "classifier.")):
            continue
        m = re.fullmatch(r"(?:module\.)?features\.(\d+)\.(weight|bias)", key)
        if m:
            i = int(m.group(1))
            if i >= _SLICE_ENDS[-1]:
                continue  # the final max-pool has no weights; defensive
            k = next(n for n, end in enumerate(_SLICE_ENDS, start=1) if i < end)
            key = f"net.slice{k}.{i}.{m.group(2)}"
        out[key] = value
    return out


def _read_file(path: Path) -> dict[str, Tensor]:
    """A flat state dict from a weights file, through the library's safe readers."""
    from dmvae.files import CheckpointError, read_state_dict_file

    if not path.is_file():
        raise LPIPSWeightsError(f"LPIPS weights file not found: {path}")
    try:  # safetensors, or torch.load(weights_only=True); {"state_dict": ...} is unwrapped
        return read_state_dict_file(path)
    except CheckpointError as e:
        raise LPIPSWeightsError(f"could not read LPIPS weights {path}: {e}") from e


def _resolve_source(src: WeightsSource) -> tuple[dict[str, Tensor], str]:
    from dmvae.sources import resolve_file

    if isinstance(src, Mapping):
        return dict(src), "<state dict>"
    s = os.fspath(src)
    try:  # a local path or hf://owner/repo/file (cache only when the Hub is unreachable)
        path = resolve_file(s, what="LPIPS weights")
    except FileNotFoundError as e:
        raise LPIPSWeightsError(str(e)) from e
    return _read_file(path), s


def _torchvision_cache_file() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_VGG16_FILE


def _lpips_wheel_heads_file() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1" / "vgg.pth"
    return path if path.is_file() else None


class LPIPS(FrozenModule):
    """LPIPS-VGG distance; frozen, ``forward(x, y) -> (B,)`` for images in [-1, 1].

    Args:
        net: backbone; only ``"vgg"`` (the one DMVAE and taming train with) is implemented.
        weights: explicit weights (see the module docstring): a path, ``"hf://owner/repo/file"``, a
            state dict, or a list of these (e.g. trunk file + heads file). None = search the
            environment variable and the caches.
        pretrained: False = random weights, no search (tests only; the distances mean nothing).
    """

    def __init__(
        self,
        net: str = "vgg",
        weights: WeightsSource | Sequence[WeightsSource] | None = None,
        *,
        pretrained: bool = True,
    ) -> None:
        super().__init__()
        if net not in ("vgg", "vgg16"):
            raise ValueError(f"LPIPS net must be 'vgg' (VGG16), got {net!r}")
        if not pretrained and weights is not None:
            raise ValueError("pass either weights=... or pretrained=False, not both")
        # Input scaling of LPIPS v0.1: ((x - shift) / scale), x in [-1, 1]; constants, not in the state dict.
        self.register_buffer(
            "shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False
        )
        self.net = _VGGSlices()
        for k, c in enumerate(VGG_LPIPS_CHANNELS):
            self.add_module(f"lin{k}", _LinHead(c))
        if pretrained:
            self._load_weights(weights)
        else:
            warnings.warn(
                "LPIPS(pretrained=False): random VGG trunk and heads; distances are meaningless "
                "(use only for tests)",
                stacklevel=2,
            )
            with torch.no_grad():  # heads are non-negative in the trained model; keep that property
                for k in range(len(VGG_LPIPS_CHANNELS)):
                    w = getattr(self, f"lin{k}").model[1].weight
                    w.copy_(torch.rand_like(w) / w.shape[1])
        self.freeze()  # a metric: ignores train() from a parent module

    # ------------------------------------------------------------------ weights
    def _load_weights(self, weights: WeightsSource | Sequence[WeightsSource] | None) -> None:
        sources: list[WeightsSource]
        searched: list[str] = []
        if weights is None and os.environ.get(ENV_VAR):
            sources = list(os.environ[ENV_VAR].split(os.pathsep))
            searched.append(f"${ENV_VAR}={os.environ[ENV_VAR]}")
        elif weights is None:
            sources = []
        elif isinstance(weights, (str, os.PathLike, Mapping)):
            sources = [weights]
        else:
            sources = list(weights)

        sd: dict[str, Tensor] = {}
        for src in sources:
            part, _name = _resolve_source(src)
            sd.update(convert_lpips_state_dict(part))

        expected = self.state_dict()
        trunk_keys = {k for k in expected if k.startswith("net.")}
        head_keys = {k for k in expected if k.startswith("lin")}
        if not trunk_keys <= sd.keys():
            tv = _torchvision_cache_file()
            searched.append(str(tv))
            if tv.is_file():
                part = convert_lpips_state_dict(_read_file(tv))
                sd.update({k: v for k, v in part.items() if k in trunk_keys and k not in sd})
        if not head_keys <= sd.keys():
            wheel = _lpips_wheel_heads_file()
            searched.append(str(wheel) if wheel else "lpips package (not installed)")
            if wheel is not None:
                part = convert_lpips_state_dict(_read_file(wheel))
                sd.update({k: v for k, v in part.items() if k in head_keys and k not in sd})

        missing = sorted(set(expected) - sd.keys())
        unexpected = sorted(sd.keys() - set(expected))
        if missing:
            groups = []
            if any(k.startswith("net.") for k in missing):
                groups.append(
                    f"the VGG16 trunk ({len([k for k in missing if k.startswith('net.')])} tensors "
                    f"net.slice*.*; torchvision file {TORCHVISION_VGG16_FILE})"
                )
            if any(k.startswith("lin") for k in missing):
                groups.append("the linear heads (lin0..4.model.1.weight; `pip install lpips` ships them)")
            raise LPIPSWeightsError(
                f"LPIPS-VGG weights incomplete: missing {' and '.join(groups)}. Searched: "
                f"{searched or ['nothing']}. Provide them with LPIPS(weights='path.safetensors' | "
                f"'hf://owner/repo/file' | [trunk_file, heads_file]) or ${ENV_VAR}, copy "
                f"{TORCHVISION_VGG16_FILE} into {_torchvision_cache_file().parent}, or use "
                f"pretrained=False for tests. First missing keys: {missing[:4]}"
            )
        if unexpected:
            raise LPIPSWeightsError(
                f"LPIPS weights have unexpected keys {unexpected[:8]}"
                f"{' ...' if len(unexpected) > 8 else ''}; expected only net.slice*.* and lin*.model.1.weight"
            )
        bad = [
            f"{k}: expected {tuple(expected[k].shape)}, got {tuple(sd[k].shape)}"
            for k in expected
            if tuple(sd[k].shape) != tuple(expected[k].shape)
        ]
        if bad:
            raise LPIPSWeightsError(f"LPIPS weights have wrong shapes: {bad[:8]}")
        self.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)

    # ------------------------------------------------------------------ forward
    def _features(self, x: Tensor) -> list[Tensor]:
        x = (x - self.shift) / self.scale
        return self.net(x)

    def forward(
        self, x: Tensor, y: Tensor, *, normalize: bool = False, per_layer: bool = False
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Distance per sample.

        Args:
            x, y: (B, 3, H, W) images in [-1, 1] (or [0, 1] with ``normalize=True``); H, W >= 16.
            per_layer: also return the five per-slice terms, each (B,).
        Returns:
            (B,) distances (>= 0; 0 for identical inputs).
        """
        for name, t in (("x", x), ("y", y)):  # uint8 [0, 255] read as [-1, 1] would be silently wrong
            if not isinstance(t, Tensor) or not t.is_floating_point():
                got = t.dtype if isinstance(t, Tensor) else type(t).__name__
                raise TypeError(f"LPIPS input {name} must be a floating-point tensor in [-1, 1] (or [0, 1] with "
                                f"normalize=True), got {got}; convert uint8 images with "
                                "dmvae.metrics.image.uint8_to_float (x / 127.5 - 1)")
        if x.shape != y.shape:
            raise ValueError(f"LPIPS inputs must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects (B, 3, H, W) RGB images, got shape {tuple(x.shape)}")
        if min(x.shape[-2:]) < 16:
            raise ValueError(f"LPIPS-VGG needs H, W >= 16 (four 2x pools), got {tuple(x.shape[-2:])}")
        if normalize:
            x, y = 2 * x - 1, 2 * y - 1
        dtype = self.shift.dtype
        fx = self._features(torch.cat([x, y]).to(dtype))  # one trunk pass for both, (2B, C_k, H_k, W_k)
        terms = []
        for k, f in enumerate(fx):
            f = f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)  # channel-unit-normalise
            a, b = f.chunk(2)
            d = getattr(self, f"lin{k}")((a - b).pow(2))  # (B, 1, H_k, W_k)
            terms.append(d.mean(dim=(1, 2, 3)))  # spatial mean -> (B,)
        dist = torch.stack(terms).sum(0)  # (B,)
        return (dist, terms) if per_layer else dist
