"""Stage-2 distillation losses of DSMD (docs/method.md section 1.1-1.4), and a no-distillation baseline.

Every loss is a small ``nn.Module`` whose ``forward`` returns a dict of scalar tensors: the per-modality
(or per-pair) parts plus their sum under the loss's own name, so each part can be logged on its own.
All maths runs in float32 whatever the input dtype (fp16/bf16 logits at tau=0.05 overflow).

Inputs (B = batch rows, D = teacher width, K = filled queue entries)::

    s_img, s_txt   (B, D)  student embeddings, already L2-normalised (method.md notation)
    t_img, t_txt   (B, D)  cached teacher embeddings of the same rows, L2-normalised
    img_ids        (B,)    int64 image_id of each row (rows of one image share it)
    captions_hash  (B,)    optional int64 hash of each row's caption (see ``caption_hashes``)

Typical use by a trainer::

    crit = MultiscaleDistillLoss(LossConfig(tau=0.05, margin=0.0))
    q = queue.active(device)                          # pipeline.distill.queue.ActiveQueue (or None)
    losses = crit(s_img, s_txt, t_img, t_txt, img_ids, queue=q, captions_hash=h)
    total, info = balancer(losses)                    # pipeline.distill.balancer
    total.backward()
    queue.enqueue(...)                                # only after backward: see pipeline.distill.queue

False negatives (method.md 1.1, 1.4): a negative that shares the row's ``image_id`` is masked (logit set
to -inf, or excluded from the max); for text, an identical caption (equal hash) is masked too. The
positive is never masked.

``pair`` is not a distillation loss: it is the plain CLIP objective on the ground-truth pairs (the student's
own image and text embeddings, teacher targets unused), the "no distillation" row of the ablations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from torch import Tensor, nn

from pipeline.common.errors import PipelineError
from pipeline.distill.losses.affinity import AffinityDistillLoss
from pipeline.distill.losses.common import LossInputs, caption_hashes
from pipeline.distill.losses.contrastive import ContrastiveDistillLoss, queue_contrastive
from pipeline.distill.losses.feature import FD_KINDS, FeatureDistillLoss
from pipeline.distill.losses.hard_negative import HardNegativeDistillLoss, max_violation_triplet
from pipeline.distill.losses.pair import PairContrastiveLoss
from pipeline.distill.losses.similarity import SimilarityDistillLoss

if TYPE_CHECKING:
    from pipeline.distill.queue import ActiveQueue

# name -> builder from LossConfig. A module's forward takes LossInputs and returns {name: total, parts...}.
REGISTRY: dict[str, Callable[["LossConfig"], nn.Module]] = {}


def register(name: str, build: Callable[["LossConfig"], nn.Module]) -> None:
    REGISTRY[name] = build


register("cd", lambda c: ContrastiveDistillLoss(c.tau, c.cross_modal))
register("fd", lambda c: FeatureDistillLoss(c.fd_kind))
register("sd", lambda c: SimilarityDistillLoss())
register("hnd", lambda c: HardNegativeDistillLoss(c.margin))
register("pair", lambda c: PairContrastiveLoss(c.pair_tau))

LOSS_NAMES = tuple(REGISTRY)  # the built-in losses, switched by LossConfig's own flags

# Extra losses shipped with the package (on through losses.extra, like a user's own)
register("affinity", lambda c: AffinityDistillLoss(**c.extra["affinity"]))
TEACHER_FREE_LOSSES = ("pair",)  # losses that never read teacher targets: a run with only these needs no cache


@dataclass(frozen=True)
class LossConfig:
    """Which losses are on, and their hyper-parameters (defaults: the paper's DSMD, method.md 1.6).

    ``pair`` (off by default) trains on the ground-truth pairs without the teacher (PairContrastiveLoss).
    ``extra`` turns on losses registered beyond the built-in ones, each with its own parameters:
    ``extra: {my_loss: {weight: 2}}`` in YAML (its builder reads ``config.extra["my_loss"]``).
    """

    cd: bool = True
    fd: bool = True
    sd: bool = True
    hnd: bool = True
    pair: bool = False
    tau: float = 0.05
    margin: float = 0.0
    cross_modal: bool = False
    fd_kind: str = "l1"  # l1 (method.md 1.2) | mse (CLIP-KD's feature distillation)
    pair_tau: float = 0.05
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Checked here, not only when the loss is built, so a typo fails even while that loss is off.
        if self.fd_kind not in FD_KINDS:
            raise PipelineError(f"losses.fd_kind must be one of {', '.join(FD_KINDS)}, not {self.fd_kind!r}")
        if self.pair_tau <= 0:
            raise PipelineError(f"losses.pair_tau must be > 0, got {self.pair_tau}")
        unknown = sorted(set(self.extra) - (set(REGISTRY) - set(LOSS_NAMES)))
        if unknown:
            raise PipelineError(f"losses.extra: {unknown} are not registered extra losses (registered: "
                                f"{sorted(set(REGISTRY) - set(LOSS_NAMES)) or 'none'}; built-in ones have "
                                "their own switches)")

    @property
    def enabled(self) -> tuple[str, ...]:
        """Names of the enabled losses, in a fixed order (the keys ``MultiscaleDistillLoss`` returns)."""
        return tuple(n for n in REGISTRY if (getattr(self, n) if n in LOSS_NAMES else n in self.extra))


class MultiscaleDistillLoss(nn.Module):
    """All enabled losses in one call; feed the result to a balancer (pipeline.distill.balancer).

    ``forward`` returns ``{name: scalar}`` for the enabled raw losses, in registry order.
    """

    def __init__(self, config: LossConfig | None = None) -> None:
        super().__init__()
        self.config = config or LossConfig()
        if not self.config.enabled:
            raise PipelineError("loss config enables no loss: turn on at least one of " + ", ".join(LOSS_NAMES))
        self.parts = nn.ModuleDict({n: REGISTRY[n](self.config) for n in self.config.enabled})

    @property
    def names(self) -> tuple[str, ...]:
        return self.config.enabled

    def forward(self, s_img: Tensor, s_txt: Tensor, t_img: Tensor, t_txt: Tensor, img_ids: Tensor,
                queue: "ActiveQueue | None" = None, captions_hash: Tensor | None = None,
                transfer: tuple[Tensor, Tensor, Tensor] | None = None,
                transfer_text: tuple[Tensor, Tensor, Tensor, Tensor] | None = None) -> dict[str, Tensor]:
        """Compute the enabled losses.

        Args:
            queue: the negatives for CD (``NegativeQueue.active(device)``). Required when CD is on; an
                empty queue is allowed and gives CD = 0 (no negatives yet).
            captions_hash: optional (B,) int64 caption hashes; masks identical captions in CD, HND and pair.
            transfer: optional (student, teacher, ids) of the step's transfer images (T, D), (T, D), (T,):
                caption-less images that join the image-only terms (CD, FD, SD on images, HND image-image).
            transfer_text: optional (student, teacher, ids, hashes) of the step's transfer captions: they join the
                text-only terms (CD, FD, SD on captions, HND text-text).
        """
        more = transfer if transfer is not None else (None, None, None)
        more_txt = transfer_text if transfer_text is not None else (None, None, None, None)
        inputs = LossInputs(s_img, s_txt, t_img, t_txt, img_ids, queue, captions_hash, *more, *more_txt)
        return {n: loss.of(inputs)[n] for n, loss in self.parts.items()}


__all__ = ["REGISTRY", "register", "LOSS_NAMES", "TEACHER_FREE_LOSSES", "LossConfig", "LossInputs", "MultiscaleDistillLoss", "caption_hashes",
           "ContrastiveDistillLoss", "FeatureDistillLoss", "SimilarityDistillLoss", "HardNegativeDistillLoss",
           "PairContrastiveLoss", "queue_contrastive", "max_violation_triplet", "FD_KINDS"]
