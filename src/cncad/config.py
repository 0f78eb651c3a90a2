"""The frozen configuration of a CNC model and its training run.

Every default is the paper's setting (Wang et al., AAAI 2025, "Implementation Details")
unless its docstring line says otherwise; the choices made where the paper is silent are
explained in ``docs/design.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["CNCConfig"]

PromotionNorm = Literal["token", "map"]
PromotionMode = Literal["broadcast", "direction"]
ImageScoreMode = Literal["max", "topk_mean"]
CompareGrid = Literal["common", "native"]

TIMM_PREFIX = "timm/"  # kept equal to cncad.encoders.timm.TIMM_PREFIX (config imports no torch)
_GRID_NAMES = ("coarsest", "finest")


@dataclass(frozen=True)
class CNCConfig:
    """All settings of a CNC model, its training and its scoring.

    Attributes:
        backbone: open_clip model name (``"ViT-L-14-336-quickgelu"``), ``"tiny"`` for the
            small randomly initialised test model, a path to an OpenAI-format ``.pt``
            checkpoint, an open_clip ``"local-dir:..."`` / ``"hf-hub:..."`` source,
            ``"timm/<name>"`` for a timm CNN or ViT (``"timm/tf_efficientnet_lite0"``; no
            text tower, so ``use_cnc=False``), or ``"custom"`` when an encoder or CLIP
            model object is passed to the detector.
        pretrained: open_clip pretrained tag (``"openai"``) or a local checkpoint file for
            ``backbone``; ``None`` for random weights. For ``"timm/..."`` backbones a timm
            pretrained tag (``"default"``, ``"in1k"``, downloaded from the hub); the CLIP
            default ``"openai"`` is reset to ``None`` there.
        weights: Local checkpoint file of the encoder, loaded after the model is built
            (and after ``pretrained``), for any backbone; ``None`` for none.
        weights_remap: Name of the key-remapping hook applied to ``weights`` before
            loading (``"by_order"``, ``"strip_module"``, ``"strip_visual"`` or one
            registered with [`register_remap`][cncad.encoders.weights.register_remap]); ``None``
            when the file uses the model's own key names.
        image_size: Side of the square network input. The paper uses 224 with the 336 px
            model, so the position embedding is resized to a 16x16 grid.
        layers: 1-based indices of the tapped vision blocks, shallow to deep. ``None``
            taps ``num_taps`` blocks evenly spaced over the depth, ending at the last.
            For timm CNNs the indices are pyramid levels (``feature_info`` entries);
            ``None`` taps the ``num_taps`` levels that end one before the last.
        num_taps: Number of tapped blocks when ``layers`` is ``None`` (the paper uses 3).
        feature_grid: The one token grid on which layers of unequal grids (CNN pyramids)
            are fused and decoded: ``"coarsest"`` (the deepest tapped level, cheapest),
            ``"finest"``, or a side length. Irrelevant when all grids are equal (ViTs).
        compare_grid: Where decoded and encoded features are compared (loss and anomaly
            map): ``"common"``, on ``feature_grid`` (encoder features resampled to it), or
            ``"native"``, on each layer's own grid (decoded features resampled to it).
        prompt_length: Learnable context vectors per prompt (M in eqs. 2-3).
        normal_prompt: Words after the context of the normal prompt (eq. 2).
        abnormal_prompt: Words after the context of the abnormal prompt (eq. 3).
        promotion_norm: ``"token"``: lambda = 1/||f|| per token; ``"map"``: per whole map
            (eq. 5). See ``docs/design.md``.
        promotion_mode: ``"broadcast"``: the scalar lambda*Psi is added to every channel
            (eq. 5 read literally); ``"direction"``: it is added along the token's unit
            direction.
        promotion_cosine: Whether alpha/beta (eq. 7) use the L2-normalised projected
            token (cosine similarity) rather than the raw projection.
        noise_std: Gaussian noise on the encoded features during training, relative to
            each channel's standard deviation over the batch (not given in the paper).
        fusion_dropout: Dropout of the multi-layer fusion projection (eq. 12; rate not
            given in the paper).
        num_experts: T, the number of experts (eq. 13).
        top_k: K, experts per token (eq. 14).
        expert_mlp_ratio: Hidden width of each expert MLP relative to the feature width.
        renormalize_gates: Whether the K selected gate values are renormalised to sum to 1
            (the paper uses the raw softmax values).
        decoder_mlp_ratio: MLP ratio of the decoder's transformer blocks (CLIP's is 4).
        decoder_width: Token width of fusion output, MoE and decoder. ``None``: the
            encoder's width when all tapped widths are equal (CLIP), else the largest
            tapped width. Per-layer linear heads map it back to unequal widths.
        decoder_heads: Attention heads of the decoder. ``None``: the encoder's when it is
            a transformer of the same width, else the largest count <= width / 32 that
            divides the width.
        tau: Temperature of the alignment losses (eqs. 4, 10).
        gamma: Weight of the decoder alignment loss (eq. 11).
        theta: Epoch from which the decoder alignment loss is added (eq. 11).
        gamma_ramp_epochs: Stabiliser, off (0) by default as in the paper: from epoch
            ``theta`` on, γ of eq. 11 grows linearly over this many epochs
            (``γ · min(1, (epoch - θ + 1) / gamma_ramp_epochs)``) instead of switching on
            at once. See ``docs/benchmarks.md`` ("The θ transition").
        detach_text_anchors: Whether the text features are detached where they serve as
            anchors, in eq. 10 and in the normality promotion (eqs. 5-8), so that only
            eq. 4 trains the prompts ("textual features trained by (4) as anchors"). False
            lets every loss move the prompts. See ``docs/design.md``.
        moe_loss_weight: Weight of the importance loss in the total loss (eq. 16 uses 1).
        moe_loss_eps: Epsilon of the importance loss (eq. 15).
        use_mlf: Multi-layer fusion switch (Table 2 "MLF"); off: the deepest tapped feature
            alone feeds the decoder.
        use_cnc: Cross-modal normality constraint switch (Table 2 "CNC"): prompts,
            normality promotion and the constraint loss.
        use_moe: Gated mixture-of-experts switch (Table 2 "MoE").
        lr: Adam learning rate.
        weight_decay: Adam weight decay (the paper states none).
        grad_clip_norm: Stabiliser, off (None) by default as in the paper: clip the global
            L2 norm of the trainable parameters' gradient to this value before each step.
        batch_size: Training batch size.
        epochs: Training epochs (250 for MVTec AD, 200 for VisA in the paper).
        num_workers: DataLoader workers for folder and dataset inputs.
        sigma: Gaussian smoothing of the anomaly map in pixels of the ``image_size`` grid;
            0 disables it.
        image_score: ``"max"`` of the anomaly map (the paper) or ``"topk_mean"``.
        topk: Pixels averaged by ``"topk_mean"``: a count, or a fraction when below 1.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        seed: Seed of the weight initialisation, data order, noise and dropout.
        bf16: bfloat16 autocast for the forward passes on CUDA.
    """

    backbone: str = "ViT-L-14-336-quickgelu"
    pretrained: str | None = "openai"
    image_size: int = 224
    layers: tuple[int, ...] | None = None
    num_taps: int = 3
    weights: str | None = None
    weights_remap: str | None = None
    feature_grid: Literal["coarsest", "finest"] | int = "coarsest"
    compare_grid: CompareGrid = "common"
    prompt_length: int = 12
    normal_prompt: str = "object"
    abnormal_prompt: str = "damaged object"
    promotion_norm: PromotionNorm = "token"
    promotion_mode: PromotionMode = "broadcast"
    promotion_cosine: bool = True
    noise_std: float = 0.1
    fusion_dropout: float = 0.1
    num_experts: int = 5
    top_k: int = 2
    expert_mlp_ratio: float = 1.0
    renormalize_gates: bool = False
    decoder_mlp_ratio: float = 4.0
    decoder_width: int | None = None
    decoder_heads: int | None = None
    tau: float = 0.001
    gamma: float = 0.1
    theta: int = 5
    gamma_ramp_epochs: int = 0
    detach_text_anchors: bool = True
    moe_loss_weight: float = 1.0
    moe_loss_eps: float = 1e-10
    use_mlf: bool = True
    use_cnc: bool = True
    use_moe: bool = True
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip_norm: float | None = None
    batch_size: int = 8
    epochs: int = 250
    num_workers: int = 0
    sigma: float = 4.0
    image_score: ImageScoreMode = "max"
    topk: float = 0.01
    device: str = "auto"
    seed: int = 0
    bf16: bool = False

    def __post_init__(self) -> None:
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        _check(self.image_size > 0, "image_size must be positive")
        if self.backbone.startswith(TIMM_PREFIX):
            _check(
                not self.use_cnc,
                f"backbone {self.backbone!r} has no text tower, which CNC (use_cnc=True) "
                "needs for its prompts; set use_cnc=False for the visual-only model "
                "(fusion + MoE + decoder, Table 2 row vi) or use a CLIP backbone",
            )
            if self.pretrained == "openai":
                object.__setattr__(self, "pretrained", None)
        if isinstance(self.feature_grid, str):
            _check(
                self.feature_grid in _GRID_NAMES,
                f"feature_grid: 'coarsest', 'finest' or a side length, got {self.feature_grid!r}",
            )
        else:
            _check(
                isinstance(self.feature_grid, int) and self.feature_grid >= 1,
                "feature_grid must be a positive side length",
            )
        _check(self.compare_grid in ("common", "native"), "compare_grid: 'common' or 'native'")
        _check(
            self.decoder_width is None or self.decoder_width >= 1,
            "decoder_width must be positive",
        )
        _check(
            self.decoder_heads is None or self.decoder_heads >= 1,
            "decoder_heads must be positive",
        )
        _check(self.num_taps >= 1, "num_taps must be at least 1")
        if self.layers is not None:
            _check(len(self.layers) >= 1, "layers must name at least one block")
            _check(min(self.layers) >= 1, "layers are 1-based block indices")
            _check(
                list(self.layers) == sorted(set(self.layers)),
                f"layers must be strictly increasing (shallow to deep), got {self.layers}",
            )
        _check(self.prompt_length >= 1, "prompt_length must be at least 1")
        _check(self.promotion_norm in ("token", "map"), "promotion_norm: 'token' or 'map'")
        _check(
            self.promotion_mode in ("broadcast", "direction"),
            "promotion_mode: 'broadcast' or 'direction'",
        )
        _check(self.noise_std >= 0, "noise_std must be >= 0")
        _check(0 <= self.fusion_dropout < 1, "fusion_dropout must be in [0, 1)")
        _check(self.num_experts >= 1, "num_experts must be at least 1")
        _check(
            1 <= self.top_k <= self.num_experts,
            f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}",
        )
        _check(self.expert_mlp_ratio > 0, "expert_mlp_ratio must be positive")
        _check(self.tau > 0, "tau must be positive")
        _check(self.theta >= 0, "theta must be >= 0")
        _check(self.gamma_ramp_epochs >= 0, "gamma_ramp_epochs must be >= 0")
        _check(
            self.grad_clip_norm is None or self.grad_clip_norm > 0,
            f"grad_clip_norm must be positive or None, got {self.grad_clip_norm}",
        )
        _check(self.lr > 0, "lr must be positive")
        _check(self.batch_size >= 1, "batch_size must be at least 1")
        _check(self.epochs >= 0, "epochs must be >= 0")
        _check(self.sigma >= 0, "sigma must be >= 0")
        _check(self.image_score in ("max", "topk_mean"), "image_score: 'max' or 'topk_mean'")
        _check(self.topk > 0, "topk must be positive")

    def replace(self, **changes: Any) -> CNCConfig:
        """Return a copy with ``changes`` applied (validated like the constructor)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown CNCConfig field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict of the public fields (JSON and ``weights_only`` safe)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CNCConfig:
        """Build a config from [`to_dict`][cncad.config.CNCConfig.to_dict] output.

        Unknown keys are an error.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown CNCConfig field(s): {', '.join(sorted(unknown))}")
        return cls(**data)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"CNCConfig: {message}")
