"""The paper's 2-D study (Sec. 3.2, Fig. 3) behind ``dmvae demo``: free points aligned with an
S-shape by the DM loss, the objectives the paper compares, and the pictures.

* :mod:`dmvae.demo.toy2d` -- the study: :class:`Toy2DConfig`, :func:`run_toy2d`, the metrics;
* :mod:`dmvae.demo.objectives` -- the research objectives and the paper's finding for each;
* :mod:`dmvae.demo.figure` -- ``demo.png`` (four panels) and ``compare.png`` (one per objective).

This is an example built on the library (``dmvae.priors``, ``dmvae.dm_loss``,
``dmvae.metrics.distribution``), not a part the library depends on.
"""

from dmvae.demo import figure, toy2d
from dmvae.demo.figure import save_compare_figure, save_figure
from dmvae.demo.objectives import COMPARE_OBJECTIVES, FINDINGS, OBJECTIVES
from dmvae.demo.toy2d import (
    Toy2DConfig,
    Toy2DResult,
    Toy2DRun,
    align_points,
    energy_floor,
    evaluate_points,
    initial_points,
    make_score_net,
    run_toy2d,
    train_real_score,
    update_field,
)

# The study's and the figures' public names (each module's __all__ is the one list), and the objectives' tables.
__all__ = sorted({*toy2d.__all__, *figure.__all__, "FINDINGS", "OBJECTIVES"})
