"""The frozen configuration of a CNC model and its training run.

Every default is the paper's setting (Wang et al., AAAI 2025, "Implementation Details")
unless its docstring line says otherwise; the choices made where the paper is silent are
explained in ``docs/design.md``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, get_args

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

    Every value is checked when the config is made (by the constructor,
    [`replace`][cncad.config.CNCConfig.replace] or
    [`from_dict`][cncad.config.CNCConfig.from_dict]): ints where ints are expected (not
    ``56.0``, not ``True``), finite numbers where floats are expected (an int is accepted
    and stored as a float), bools for the switches, one of the listed strings for the
    choices, and each within its range. ``seed`` is an int in ``[0, 2**63)``, which every
    random generator cncad seeds accepts. ``os.PathLike`` values of ``backbone``,
    ``pretrained`` and ``weights`` are stored as str.

    Raises:
        TypeError: A value has the wrong type; one line
            ``CNCConfig.<field> must be <expected>, got <value>``.
        ValueError: A value is out of range, or contradicts another (``top_k`` above
            ``num_experts``, ``decoder_heads`` not dividing ``decoder_width``, CNC with a
            backbone without a text tower); one line of the same form.
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
        for name, rule in _RULES.items():
            object.__setattr__(self, name, rule(name, getattr(self, name)))
        if self.backbone.startswith(TIMM_PREFIX):
            if self.use_cnc:
                _fail(
                    "use_cnc",
                    f"False with backbone {self.backbone!r} (it has no text tower, which CNC "
                    "needs for its prompts; use_cnc=False gives the visual-only model of "
                    "Table 2 row vi: fusion + MoE + decoder), or the backbone a CLIP model",
                    self.use_cnc,
                )
            if self.pretrained == "openai":
                object.__setattr__(self, "pretrained", None)
        if self.top_k > self.num_experts:
            _fail("top_k", f"an int in [1, num_experts={self.num_experts}]", self.top_k)
        if (
            self.decoder_width is not None
            and self.decoder_heads is not None
            and self.decoder_width % self.decoder_heads
        ):
            _fail(
                "decoder_heads",
                f"a divisor of decoder_width={self.decoder_width}",
                self.decoder_heads,
            )

    def replace(self, **changes: Any) -> CNCConfig:
        """Return a copy with ``changes`` applied (validated like the constructor).

        Args:
            **changes: New values of fields.

        Returns:
            The new config; ``self`` is unchanged.

        Raises:
            TypeError: A name is not a field, or a value has the wrong type.
            ValueError: A value is out of range.
        """
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

        Missing keys take their defaults; every value is validated as by the constructor
        (a saved int where a float is expected is accepted).

        Args:
            data: ``{field name: value}``.

        Returns:
            The config.

        Raises:
            TypeError: ``data`` is not a mapping, or a value has the wrong type.
            ValueError: A key is not a field, or a value is out of range.
        """
        if not isinstance(data, Mapping):
            raise TypeError(
                f"CNCConfig.from_dict needs a dict of field values, got {type(data).__name__}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            listed = ", ".join(sorted(str(key) for key in unknown))
            raise ValueError(f"unknown CNCConfig field(s): {listed}")
        return cls(**data)


# --------------------------------------------------------------------------------------
# Validation: one rule per field. A rule gets the field's name and value, raises TypeError
# (wrong type) or ValueError (right type, value out of range) with one line
# "CNCConfig.<name> must be <expected>, got <repr>", and returns the value normalised
# (ints for integral fields, floats for real ones, tuples for sequences, str for paths).
# --------------------------------------------------------------------------------------

_Rule = Callable[[str, Any], Any]

_SEED_LIMIT = 2**63
"""Seeds are ints in ``[0, 2**63)``: they fit a signed 64-bit integer, which
``torch.manual_seed``, ``torch.Generator.manual_seed`` and NumPy's ``SeedSequence`` all
accept."""


def _fail(name: str, expected: str, value: Any, error: type[Exception] = ValueError) -> NoReturn:
    raise error(f"CNCConfig.{name} must be {expected}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _bounds_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def _in_bounds(
    value: float, low: float | None, high: float | None, low_open: bool, high_open: bool
) -> bool:
    if low is not None and (value <= low if low_open else value < low):
        return False
    return high is None or (value < high if high_open else value <= high)


def _int(low: int | None = None, high: int | None = None, high_text: str | None = None) -> _Rule:
    """An int (numpy ints too, never a bool or a float) in ``[low, high)``."""
    bounds = high_text or _bounds_text(low, high, False, True)
    expected = f"an int {bounds}".rstrip()

    def rule(name: str, value: Any) -> int:
        if not _is_int(value):
            _fail(name, expected, value, TypeError)
        if not _in_bounds(value, low, high, False, True):
            _fail(name, expected, value)
        return int(value)

    return rule


def _real(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> _Rule:
    """A finite number (an int is accepted where a float is expected) within the bounds."""
    expected = f"a finite number {_bounds_text(low, high, low_open, high_open)}".rstrip()

    def rule(name: str, value: Any) -> float:
        if not _is_real(value):
            _fail(name, expected, value, TypeError)
        if not math.isfinite(value) or not _in_bounds(value, low, high, low_open, high_open):
            _fail(name, expected, value)
        return float(value)

    return rule


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        _fail(name, "a bool (True or False)", value, TypeError)
    return value


def _text(*, path: bool = False, allow_empty: bool = False) -> _Rule:
    """A str (or, for ``path``, an ``os.PathLike``, stored as str); non-empty unless allowed."""
    expected = "a non-empty str" if not allow_empty else "a str"
    if path:
        expected += " or path"

    def rule(name: str, value: Any) -> str:
        if path and isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            _fail(name, expected, value, TypeError)
        if not allow_empty and not value.strip():
            _fail(name, expected, value)
        return value

    return rule


def _choice(*allowed: str) -> _Rule:
    expected = "one of " + ", ".join(repr(choice) for choice in allowed)

    def rule(name: str, value: Any) -> str:
        if not isinstance(value, str):
            _fail(name, expected, value, TypeError)
        if value not in allowed:
            _fail(name, expected, value)
        return value

    return rule


def _optional(rule: _Rule) -> _Rule:
    """``rule``, or ``None``; the message says that ``None`` is allowed too."""

    def optional(name: str, value: Any) -> Any:
        if value is None:
            return None
        try:
            return rule(name, value)
        except (TypeError, ValueError) as error:
            raise type(error)(str(error).replace(", got ", " or None, got ", 1)) from None

    return optional


def _layers(name: str, value: Any) -> tuple[int, ...] | None:
    expected = "None or a non-empty, strictly increasing sequence of ints >= 1 (1-based)"
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        _fail(name, expected, value, TypeError)
    if not all(_is_int(i) for i in value):
        _fail(name, expected, value, TypeError)
    layers = tuple(int(i) for i in value)
    if not layers or layers[0] < 1 or any(a >= b for a, b in itertools.pairwise(layers)):
        _fail(name, expected, value)
    return layers


def _feature_grid(name: str, value: Any) -> str | int:
    expected = f"{', '.join(repr(g) for g in _GRID_NAMES)} or a side length (an int >= 1)"
    if isinstance(value, str):
        if value not in _GRID_NAMES:
            _fail(name, expected, value)
        return value
    if not _is_int(value):
        _fail(name, expected, value, TypeError)
    if value < 1:
        _fail(name, expected, value)
    return int(value)


def _topk(name: str, value: Any) -> float:
    expected = "a fraction in (0, 1) or a whole pixel count >= 1 (finite)"
    if not _is_real(value):
        _fail(name, expected, value, TypeError)
    if not math.isfinite(value) or value <= 0 or (value >= 1 and value != int(value)):
        _fail(name, expected, value)
    return float(value)


_DEVICE = re.compile(r"[a-z][a-z0-9_]*(:[0-9]+)?")


def _device(name: str, value: Any) -> str:
    expected = "'auto' or a torch device such as 'cpu', 'cuda' or 'cuda:1'"
    if not isinstance(value, str):
        _fail(name, expected, value, TypeError)
    if not _DEVICE.fullmatch(value):
        _fail(name, expected, value)
    return value


_RULES: dict[str, _Rule] = {
    "backbone": _text(path=True),
    "pretrained": _optional(_text(path=True)),
    "image_size": _int(1),
    "layers": _layers,
    "num_taps": _int(1),
    "weights": _optional(_text(path=True)),
    "weights_remap": _optional(_text()),
    "feature_grid": _feature_grid,
    "compare_grid": _choice(*get_args(CompareGrid)),
    "prompt_length": _int(1),
    "normal_prompt": _text(allow_empty=True),
    "abnormal_prompt": _text(allow_empty=True),
    "promotion_norm": _choice(*get_args(PromotionNorm)),
    "promotion_mode": _choice(*get_args(PromotionMode)),
    "promotion_cosine": _bool,
    "noise_std": _real(0),
    "fusion_dropout": _real(0, 1, high_open=True),
    "num_experts": _int(1),
    "top_k": _int(1),
    "expert_mlp_ratio": _real(0, low_open=True),
    "renormalize_gates": _bool,
    "decoder_mlp_ratio": _real(0, low_open=True),
    "decoder_width": _optional(_int(1)),
    "decoder_heads": _optional(_int(1)),
    "tau": _real(0, low_open=True),
    "gamma": _real(0),
    "theta": _int(0),
    "gamma_ramp_epochs": _int(0),
    "detach_text_anchors": _bool,
    "moe_loss_weight": _real(0),
    "moe_loss_eps": _real(0),
    "use_mlf": _bool,
    "use_cnc": _bool,
    "use_moe": _bool,
    "lr": _real(0, low_open=True),
    "weight_decay": _real(0),
    "grad_clip_norm": _optional(_real(0, low_open=True)),
    "batch_size": _int(1),
    "epochs": _int(0),
    "num_workers": _int(0),
    "sigma": _real(0),
    "image_score": _choice(*get_args(ImageScoreMode)),
    "topk": _topk,
    "device": _device,
    "seed": _int(0, _SEED_LIMIT, high_text="in [0, 2**63)"),
    "bf16": _bool,
}
