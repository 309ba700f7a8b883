"""Reference distributions p_r(z) and the prior registry.

A *reference prior* is the distribution the aggregate posterior q(z) of the encoder is pulled
towards by the distribution-matching loss (paper Sec. 3.1, Eq. 8; Table 1 lists the priors the
paper compares). The loss only needs two things from it:

* samples z ~ p_r, to fit a score network ("reference modelling", paper App. B.2) or to measure
  how close q(z) is, and
* the *real velocity* of p_r along the library's flow-matching path, which plays the role of the
  teacher score s_real in Eq. 8.

Time convention (the library's, = the reference code's, = SiT's; the paper's is the reverse)::

    x_t = t * x + (1 - t) * eps,   x ~ p_r, eps ~ N(0, I)        t = 1: data, t = 0: noise
    v(x_t, t) = E[x - eps | x_t]                                  (the flow-matching velocity)
    x_hat(x_t, t) = E[x | x_t] = x_t + (1 - t) * v(x_t, t)        (predicted clean sample)
    score(x_t, t) = grad log p_t(x_t) = (t * v - x_t) / (1 - t)

The paper writes z_t = alpha_t z_0 + sigma_t eps with t = 1 noise (Eq. 3); its time s is 1 - t.

Third-party packages add priors with an entry point in group ``dmvae.priors`` whose object is a
``ReferencePrior`` subclass or a factory callable (see ``docs/prior_plugins.md``).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from dmvae._registry import Registry
from dmvae.transport import (
    MIN_ONE_MINUS_T,
    batch_time,
    data_from_velocity,
    score_from_velocity,
    velocity_from_data,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "PRIORS",
    "ReferencePrior",
    "create_prior",
    "list_priors",
    "register_prior",
]

ENTRY_POINT_GROUP = "dmvae.priors"


class ReferencePrior(nn.Module, abc.ABC):
    """Abstract reference distribution over latents of shape ``self.shape``.

    Subclasses implement :meth:`sample` and either :meth:`velocity` or :meth:`predict_x`
    (the other one is derived: ``x_hat = x_t + (1 - t) v``). A prior is an ``nn.Module`` so its
    tensors (means, sample banks, backbones) move with ``.to(device)``; it is called like a
    velocity model, ``prior(x_t, t, labels)``, so it can stand in wherever a LatentDiT is accepted.

    Attributes:
        shape: shape of one sample (without the batch dimension), e.g. ``(32, 16, 16)`` or ``(2,)``.
        num_classes: number of classes if the prior is class-conditional (``labels`` select a
            conditional p_r(z | y)), else ``None``.
    """

    shape: tuple[int, ...]
    num_classes: int | None = None

    def __init__(self, shape: Sequence[int], num_classes: int | None = None) -> None:
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if not shape or any(s <= 0 for s in shape):
            raise ValueError(f"prior shape must be a non-empty tuple of positive ints, got {shape}")
        self.shape = shape
        self.num_classes = num_classes

    # ------------------------------------------------------------------ interface
    @abc.abstractmethod
    def sample(
        self,
        n: int,
        *,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Draw ``n`` samples, shape ``(n, *self.shape)``, float32."""

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Flow-matching velocity ``E[x - eps | x_t]`` of p_r at time ``t`` (t = 1 data)."""
        self._check_overrides("predict_x")
        x_t, t = self._check_xt(x_t, t)
        return velocity_from_data(x_t, self.predict_x(x_t, t, labels), t, eps=MIN_ONE_MINUS_T)

    def predict_x(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Posterior mean ``E[x | x_t] = x_t + (1 - t) v(x_t, t)`` (the DM loss's x_hat)."""
        self._check_overrides("velocity")
        x_t, t = self._check_xt(x_t, t)
        return data_from_velocity(x_t, self.velocity(x_t, t, labels), t)

    def score(
        self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``grad log p_t(x_t) = (t v - x_t) / (1 - t)``; singular at t = 1 (clamped)."""
        x_t, t = self._check_xt(x_t, t)
        return score_from_velocity(x_t, self.velocity(x_t, t, labels), t, eps=MIN_ONE_MINUS_T)

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``prior(x_t, t, labels)`` is :meth:`velocity` (the LatentDiT calling convention)."""
        return self.velocity(x_t, t, labels)

    # ------------------------------------------------------------------ helpers
    def extra_repr(self) -> str:
        return f"shape={self.shape}, num_classes={self.num_classes}"

    @property
    def dim(self) -> int:
        """Number of scalars in one sample."""
        return math.prod(self.shape)

    def _check_overrides(self, other: str) -> None:
        """Each of velocity() / predict_x() is derived from the other: a subclass must override one."""
        if getattr(type(self), other) is getattr(ReferencePrior, other):
            raise NotImplementedError(f"{type(self).__name__} must implement velocity() or predict_x()")

    def _check_xt(self, x_t: torch.Tensor, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x_t, torch.Tensor):
            raise TypeError(f"x_t must be a Tensor, got {type(x_t).__name__}")
        if tuple(x_t.shape[1:]) != self.shape:
            raise ValueError(
                f"{type(self).__name__} expects x_t of shape (B, {', '.join(map(str, self.shape))}),"
                f" got {tuple(x_t.shape)}"
            )
        return x_t, batch_time(t, x_t.shape[0], x_t.device).float()

    def _check_labels(self, labels: torch.Tensor | None, n: int) -> torch.Tensor | None:
        if labels is None:
            return None
        if self.num_classes is None:
            raise ValueError(f"{type(self).__name__} is unconditional; pass labels=None")
        labels = torch.as_tensor(labels)
        if labels.shape != (n,) or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"labels must be an integer tensor of shape ({n},), got {labels.dtype} {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}] ({self.num_classes} = unconditional),"
                f" got range [{int(labels.min())}, {int(labels.max())}]"
            )
        return labels.long()


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against ``like``."""
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


# ---------------------------------------------------------------------- registry
P = TypeVar("P", bound=Callable[..., ReferencePrior])
#: name (lower case) -> prior class or factory; built-ins, ``register_prior`` and entry points.
PRIORS: Registry[Callable[..., ReferencePrior]] = Registry("prior")
_ENTRY_POINTS_LOADED = False


def register_prior(name: str | Callable[..., ReferencePrior] | None = None, *, override: bool = False):
    """Register a prior class or factory under ``name`` (decorator or plain call).

    ``@register_prior("gmm")`` / ``@register_prior`` (uses the lower-cased class name) /
    ``register_prior("mine")(MyPrior)``. Names are case-insensitive. Re-registering an existing
    name raises unless ``override=True``.
    """
    if name is not None and not isinstance(name, str):
        if callable(name):  # bare @register_prior
            return register_prior(None, override=override)(name)
        raise TypeError(
            "register_prior expects a name (str) or a ReferencePrior class / factory to decorate, "
            f"got {type(name).__name__} {name!r}"
        )

    def deco(obj: P) -> P:
        if not callable(obj):
            raise TypeError(f"register_prior expects a class or factory, got {type(obj).__name__} {obj!r}")
        key = name if name is not None else getattr(obj, "__name__", None)
        if not key:
            raise ValueError("register_prior needs a name for objects without __name__")
        PRIORS.register(key.lower(), obj, override=override)
        return obj

    return deco


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in PRIORS:
            continue  # built-ins and explicit registrations win
        PRIORS.register(ep.name.lower(), _LazyEntryPoint(ep))


class _LazyEntryPoint:
    """Imports a plugin only when the prior is actually created."""

    def __init__(self, ep: Any) -> None:
        self.ep = ep

    def __call__(self, **kwargs: Any) -> ReferencePrior:
        try:
            obj = self.ep.load()
        except Exception as e:  # pragma: no cover - depends on third-party packages
            raise ImportError(
                f"could not load prior plugin {self.ep.name!r} ({self.ep.value}) from entry-point"
                f" group {ENTRY_POINT_GROUP!r}: {e}"
            ) from e
        prior = obj(**kwargs)
        if not isinstance(prior, ReferencePrior):
            raise TypeError(
                f"prior plugin {self.ep.name!r} ({self.ep.value}) returned"
                f" {type(prior).__name__}, expected a dmvae.priors.ReferencePrior"
            )
        return prior

    def __repr__(self) -> str:
        return f"<entry point {self.ep.name} = {self.ep.value}>"


def list_priors() -> list[str]:
    """Names accepted by :func:`create_prior` (built-ins plus installed plugins), sorted."""
    _load_entry_points()
    return PRIORS.names()


def create_prior(name: str, **kwargs: Any) -> ReferencePrior:
    """Build a registered prior: ``create_prior("gaussian", shape=(32, 16, 16))``.

    An unknown name raises ``KeyError`` (:class:`dmvae._registry.UnknownNameError`) naming the
    closest known name and listing them all; a name that is not a string raises ``TypeError``."""
    if not isinstance(name, str):
        raise TypeError(f"create_prior expects a prior name (str), e.g. 'gaussian'; got {type(name).__name__} {name!r}")
    _load_entry_points()
    prior = PRIORS.get(name)(**kwargs)
    if not isinstance(prior, ReferencePrior):
        raise TypeError(f"prior factory {name!r} returned {type(prior).__name__}, expected a ReferencePrior")
    return prior
