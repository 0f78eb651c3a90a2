"""CNCModel: the frozen CLIP teacher and the trainable CNC student, composed.

Data flow (eq. numbers of the paper)::

    images -> encode: frozen encoder (CLIP, or timm without CNC; tokens of the taps f_1..f_N)
    forward_features:
           -> resample to one grid (unequal CNN grids only) -> FeatureNoise (training only)
           -> MultiLayerFusion (eq. 12) -> GatedMoE (eqs. 13-14)
           -> ResidualAttentionDecoder (deep -> shallow: f̂_N..f̂_1) -> per-layer heads
              (unequal widths only)
    PromptLearner (eqs. 2-3) -> text features g_n^i, g_a^i
    FeatureNormalityPromotion (eqs. 5-8) on f_i and f̂_i -> f*_i, f̂*_i
    training: losses (eqs. 4, 9, 10, 11, 15, 16); inference: anomaly map (eq. 17)

With CLIP every tapped layer has the same width and grid, and the extra steps are
identities (no modules are created for them, so saved CLIP detectors are unchanged).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from timm.models import named_apply
from timm.models.vision_transformer import init_weights_vit_timm
from torch import Tensor, nn

from cncad.config import CNCConfig
from cncad.encoders.base import EncoderFeatures, FrozenEncoder, Grid, resample_tokens
from cncad.encoders.clip import CLIPEncoder, clip_bpe_tokenizer, load_clip
from cncad.encoders.timm import TIMM_PREFIX, TimmEncoder
from cncad.encoders.weights import load_encoder_weights
from cncad.losses import LossTerms, alignment_loss, constraint_loss, distillation_loss, total_loss
from cncad.modules import (
    FeatureNoise,
    FeatureNormalityPromotion,
    GatedMoE,
    MultiLayerFusion,
    PromptLearner,
    ResidualAttentionDecoder,
    importance_loss,
)
from cncad.scoring import anomaly_map, image_score

__all__ = ["CNCModel", "CNCOutput"]


class CNCOutput(NamedTuple):
    """Everything one forward pass of [`CNCModel`][cncad.model.CNCModel] produces.

    Attributes:
        encoded: Per tapped layer, shallow to deep, the encoded patch tokens ``(B, L_i, C_i)``,
            promoted (f*_i, eq. 5) when CNC is on, raw (f_i) otherwise. On the common grid,
            or on each layer's own grid with ``compare_grid="native"``.
        decoded: The matching decoded patch tokens ``(B, L_i, C_i)`` (f̂*_i, eq. 8, or
            f̂_i).
        encoded_global: ``(B, N, D)`` unit global features e_i of the encoder, or None
            without CNC.
        decoded_global: ``(B, N, D)`` unit global features ê_i of the decoder, or None.
        text_normal: ``(N, D)`` normal text features g_n^i, or None; never detached (eq. 4
            trains the prompts through them), even where the promotion used detached
            copies (``config.detach_text_anchors``).
        text_abnormal: ``(N, D)`` abnormal text features g_a^i, or None; as ``text_normal``.
        gates: ``(R, T)`` router distribution over all R tokens (R = B * (1 + L) with class
            tokens, B * L without), or None without MoE.
    """

    encoded: list[Tensor]
    decoded: list[Tensor]
    encoded_global: Tensor | None
    decoded_global: Tensor | None
    text_normal: Tensor | None
    text_abnormal: Tensor | None
    gates: Tensor | None


class CNCModel(nn.Module):
    """The CNC model as one `nn.Module`, usable without [`CNCDetector`][cncad.detector.CNCDetector].

    Args:
        config: Model, loss and scoring settings (optimisation fields are not used here).
        clip_model: An open_clip model to use instead of loading ``config.backbone``.
        tokenizer: Its tokenizer (needed with ``clip_model`` when CNC is on; defaults to
            the standard CLIP BPE tokenizer).
        encoder: A ready [`FrozenEncoder`][cncad.encoders.base.FrozenEncoder] (e.g. a
            [`TimmEncoder`][cncad.encoders.timm.TimmEncoder]), or a timm model object to wrap in
            one, used instead of ``config.backbone``. ``config.weights`` is not applied to it.

    Raises:
        ValueError: ``config.use_cnc`` with an encoder that has no text tower.

    Shapes:
        forward: ``(B, 3, S, S)`` normalised images, ``S = config.image_size`` ->
        [`CNCOutput`][cncad.model.CNCOutput].
    """

    frozen_prefixes = ("encoder.", "prompt_learner.text_tower.")
    """State-dict prefixes of the frozen encoder weights, which are never saved."""

    def __init__(
        self,
        config: CNCConfig | None = None,
        clip_model: nn.Module | None = None,
        tokenizer: Callable[[list[str]], Tensor] | None = None,
        encoder: FrozenEncoder | nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.config = config = config or CNCConfig()
        self.encoder, tokenizer = _build_encoder(config, clip_model, tokenizer, encoder)
        if config.use_cnc and not self.encoder.has_text:
            raise ValueError(
                f"use_cnc=True needs an encoder with a text tower (CLIP); "
                f"{type(self.encoder).__name__} has none. Set use_cnc=False for the "
                "visual-only model (fusion + MoE + decoder, Table 2 row vi)."
            )
        widths, num_layers = self.encoder.widths, len(self.encoder.layers)
        self.common_grid: Grid = _common_grid(self.encoder.grids, config.feature_grid)
        width = config.decoder_width or (widths[0] if len(set(widths)) == 1 else max(widths))
        heads = config.decoder_heads or _decoder_heads(width, self.encoder)

        self.prompt_learner: PromptLearner | None = None
        if config.use_cnc:
            self.prompt_learner = PromptLearner(
                self.encoder.text,
                tokenizer,
                num_layers=num_layers,
                prompt_length=config.prompt_length,
                normal_words=config.normal_prompt,
                abnormal_words=config.abnormal_prompt,
            )
        self.promotion = FeatureNormalityPromotion(
            norm=config.promotion_norm, mode=config.promotion_mode, cosine=config.promotion_cosine
        )
        self.noise = FeatureNoise(config.noise_std)
        self.fusion = (
            MultiLayerFusion(widths, width, config.fusion_dropout) if config.use_mlf else None
        )
        # Width adapters exist only where widths differ (CNN pyramids), so CLIP models keep
        # their state-dict keys: the deepest layer into the decoder when fusion is off, and
        # the decoder's width back to each layer's.
        self.input_proj = (
            nn.Linear(widths[-1], width) if not config.use_mlf and widths[-1] != width else None
        )
        self.output_heads = (
            nn.ModuleList(nn.Linear(width, c) if c != width else nn.Identity() for c in widths)
            if any(c != width for c in widths)
            else None
        )
        self.moe = (
            GatedMoE(
                width,
                num_experts=config.num_experts,
                top_k=config.top_k,
                mlp_ratio=config.expert_mlp_ratio,
                renormalize=config.renormalize_gates,
            )
            if config.use_moe
            else None
        )
        self.decoder = ResidualAttentionDecoder(
            width, heads, depth=num_layers, mlp_ratio=config.decoder_mlp_ratio
        )
        for module in (self.fusion, self.input_proj, self.moe, self.decoder, self.output_heads):
            if module is not None:
                named_apply(init_weights_vit_timm, module)

    @property
    def layers(self) -> tuple[int, ...]:
        """1-based indices of the tapped encoder blocks."""
        return self.encoder.layers

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters CNC trains: prompts, fusion, width adapters, MoE and decoder."""
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """State dict without the frozen encoder weights (what a saved detector holds)."""
        return {
            key: value
            for key, value in self.state_dict().items()
            if not key.startswith(self.frozen_prefixes)
        }

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load [`trainable_state_dict`][cncad.model.CNCModel.trainable_state_dict] output.

        Every name, shape and dtype is checked before anything is loaded, so a mismatch
        leaves the model as it was.

        Raises:
            ValueError: A weight is missing, extra, or of another shape or dtype than the
                model's (one line naming it).
        """
        expected = self.trainable_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                "the weights do not fit this model configuration "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        for name, reference in expected.items():
            tensor = state[name]
            if tensor.shape != reference.shape or tensor.dtype != reference.dtype:
                raise ValueError(
                    f"weight {name!r} is {tuple(tensor.shape)} {tensor.dtype}, the model "
                    f"needs {tuple(reference.shape)} {reference.dtype}"
                )
        self.load_state_dict(state, strict=False)

    def forward(self, images: Tensor) -> CNCOutput:
        """Encode, decode and promote the features of ``images``.

        The same as ``self.forward_features(self.encode(images))``.
        """
        return self.forward_features(self.encode(images))

    @torch.no_grad()
    def encode(self, images: Tensor) -> EncoderFeatures:
        """The frozen encoder's tapped features of ``images`` (no gradient).

        They depend only on the images, so they can be computed once and cached across
        epochs (see [`FeatureCache`][cncad.data.cache.FeatureCache]).

        Args:
            images: ``(B, 3, S, S)`` normalised images.

        Returns:
            [`EncoderFeatures`][cncad.encoders.base.EncoderFeatures] of the tapped layers.
        """
        return self.encoder(images)

    def forward_features(self, features: EncoderFeatures) -> CNCOutput:
        """Everything after the frozen encoder: noise, fusion, MoE, decoder, CNC.

        Args:
            features: Output of [`encode`][cncad.model.CNCModel.encode] (possibly from a cache).

        Returns:
            [`CNCOutput`][cncad.model.CNCOutput].
        """
        grids, common = self.encoder.grids, self.common_grid
        patches = [
            resample_tokens(tokens, grid, common)
            for tokens, grid in zip(features.patch_tokens, grids, strict=True)
        ]  # (B, L, C_i) each, L = common grid
        prefix = 0 if features.class_tokens is None else 1
        layer_tokens = patches
        if features.class_tokens is not None:
            layer_tokens = [
                torch.cat([cls.unsqueeze(1), tokens], dim=1)
                for cls, tokens in zip(features.class_tokens, patches, strict=True)
            ]  # (B, 1 + L, C_i) each
        noisy = [self.noise(tokens) for tokens in layer_tokens]
        if self.fusion is not None:
            student_input = self.fusion(noisy)
        else:
            student_input = noisy[-1]
            if self.input_proj is not None:
                student_input = self.input_proj(student_input)
        gates = None
        if self.moe is not None:
            student_input, gates, _ = self.moe(student_input)
        decoded_tokens = self.decoder(student_input)[::-1]  # block j rebuilds layer N + 1 - j

        decoded = [tokens[:, prefix:] for tokens in decoded_tokens]
        if self.output_heads is not None:
            decoded = [
                head(tokens) for head, tokens in zip(self.output_heads, decoded, strict=True)
            ]
        if self.config.compare_grid == "native":
            encoded = list(features.patch_tokens)
            decoded = [resample_tokens(d, common, g) for d, g in zip(decoded, grids, strict=True)]
        else:
            encoded = patches
        if self.prompt_learner is None:
            return CNCOutput(encoded, decoded, None, None, None, None, gates)

        text_normal, text_abnormal = self.prompt_learner()
        anchor_normal, anchor_abnormal = self._text_anchors(text_normal, text_abnormal)
        encoded = [
            self.promotion(f, self.encoder.project(f), anchor_normal[i], anchor_abnormal[i])
            for i, f in enumerate(encoded)
        ]
        decoded = [
            self.promotion(f, self.encoder.project(f), anchor_normal[i], anchor_abnormal[i])
            for i, f in enumerate(decoded)
        ]
        encoded_global = torch.stack(
            [self.encoder.global_feature(cls) for cls in features.class_tokens], dim=1
        )
        decoded_global = torch.stack(
            [self.encoder.global_feature(tokens[:, 0]) for tokens in decoded_tokens], dim=1
        )
        return CNCOutput(
            encoded, decoded, encoded_global, decoded_global, text_normal, text_abnormal, gates
        )

    def _text_anchors(self, text_normal: Tensor, text_abnormal: Tensor) -> tuple[Tensor, Tensor]:
        """The text features where they serve as anchors (eqs. 5-8 and 10).

        Detached with ``config.detach_text_anchors``, so that only eq. 4 trains the
        prompts; see ``docs/design.md``, "Text anchors: which losses train the prompts".
        """
        if self.config.detach_text_anchors:
            return text_normal.detach(), text_abnormal.detach()
        return text_normal, text_abnormal

    def loss(
        self,
        output: CNCOutput,
        epoch: int,
        *,
        importance_reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> LossTerms:
        """All loss terms of one batch (eqs. 4, 9, 10, 11, 15, 16).

        With ``config.detach_text_anchors`` the text features reach eq. 10 detached (as
        they reach eqs. 5-8 in [`forward_features`][cncad.model.CNCModel.forward_features]),
        so only eq. 4 moves the prompts. Eq. 11 ramps γ in over
        ``config.gamma_ramp_epochs`` epochs (0: the paper's step).

        Args:
            output: The forward output in training mode.
            epoch: The 0-based epoch, for the schedule of eq. 11.
            importance_reduce: Sums the MoE importance vector over processes when the
                batch is split across them (see
                [`importance_loss`][cncad.modules.moe.importance_loss]); None for one.

        Returns:
            [`LossTerms`][cncad.losses.LossTerms]; switched-off components contribute zeros.
        """
        cfg = self.config
        distill = distillation_loss(output.encoded, output.decoded)
        zero = distill.new_zeros(())
        if output.text_normal is not None:
            align_enc = alignment_loss(
                output.encoded_global, output.text_normal, output.text_abnormal, cfg.tau
            )
            anchor_normal, anchor_abnormal = self._text_anchors(
                output.text_normal, output.text_abnormal
            )
            align_dec = alignment_loss(
                output.decoded_global, anchor_normal, anchor_abnormal, cfg.tau
            )
            constraint = constraint_loss(
                align_enc,
                align_dec,
                epoch,
                cfg.gamma,
                cfg.theta,
                ramp_epochs=cfg.gamma_ramp_epochs,
            )
        else:
            align_enc = align_dec = constraint = zero
        moe = zero
        if output.gates is not None:
            moe = cfg.moe_loss_weight * importance_loss(
                output.gates, cfg.moe_loss_eps, reduce=importance_reduce
            )
        return LossTerms(
            total_loss(distill, constraint, moe), distill, constraint, align_enc, align_dec, moe
        )

    @torch.no_grad()
    def predict(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Anomaly maps and image scores at the model resolution (eq. 17).

        The same as ``self.predict_features(self.encode(images))``.

        Args:
            images: ``(B, 3, S, S)`` normalised images.

        Returns:
            ``(maps, scores)``: ``(B, S, S)`` float32 maps and ``(B,)`` image scores.
        """
        return self.predict_features(self.encode(images))

    @torch.no_grad()
    def predict_features(self, features: EncoderFeatures) -> tuple[Tensor, Tensor]:
        """Anomaly maps and image scores from encoder features (e.g. cached ones).

        Args:
            features: Output of [`encode`][cncad.model.CNCModel.encode] for a batch of B images.

        Returns:
            ``(maps, scores)``: ``(B, S, S)`` float32 maps and ``(B,)`` image scores.
        """
        output = self.forward_features(features)
        maps = anomaly_map(
            output.encoded, output.decoded, self.config.image_size, sigma=self.config.sigma
        )
        k = self.config.topk
        k = int(k) if k >= 1 else float(k)
        return maps, image_score(maps, mode=self.config.image_score, k=k)


def _build_encoder(
    config: CNCConfig,
    clip_model: nn.Module | None,
    tokenizer: Callable[[list[str]], Tensor] | None,
    encoder: FrozenEncoder | nn.Module | None,
) -> tuple[FrozenEncoder, Callable[[list[str]], Tensor] | None]:
    """The frozen encoder the config (or the objects passed) asks for, and a tokenizer."""
    common = {"image_size": config.image_size, "layers": config.layers, "num_taps": config.num_taps}
    if encoder is not None:
        if isinstance(encoder, FrozenEncoder):
            return encoder, tokenizer
        return TimmEncoder(encoder, **common), tokenizer
    if clip_model is None and config.backbone.startswith(TIMM_PREFIX):
        timm_encoder = TimmEncoder(
            config.backbone,
            weights=config.weights,
            remap=config.weights_remap,
            pretrained=config.pretrained,
            **common,
        )
        return timm_encoder, None
    if clip_model is None:
        clip_model, tokenizer = load_clip(config.backbone, config.pretrained)
        if config.weights is not None:
            load_encoder_weights(clip_model, config.weights, config.weights_remap)
    elif tokenizer is None:
        tokenizer = clip_bpe_tokenizer()
    return CLIPEncoder(clip_model, with_text=config.use_cnc, **common), tokenizer


def _common_grid(grids: tuple[Grid, ...], choice: str | int) -> Grid:
    """The grid on which all layers are fused and decoded (see ``CNCConfig.feature_grid``)."""
    if isinstance(choice, int):
        return (choice, choice)
    by_area = sorted(grids, key=lambda grid: grid[0] * grid[1])
    return tuple(by_area[0] if choice == "coarsest" else by_area[-1])


def _decoder_heads(width: int, encoder: FrozenEncoder) -> int:
    """The encoder's head count when its width is the decoder's, else head width >= 32."""
    heads = encoder.num_heads
    if heads is not None and encoder.widths[-1] == width and width % heads == 0:
        return heads
    heads = max(1, width // 32)
    while width % heads:
        heads -= 1
    return heads
