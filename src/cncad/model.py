"""CNCModel: the frozen CLIP teacher and the trainable CNC student, composed.

Data flow (eq. numbers of the paper)::

    images -> CLIPEncoder (frozen; class + patch tokens of the tapped blocks f_1..f_N)
           -> FeatureNoise (training only) -> MultiLayerFusion (eq. 12)
           -> GatedMoE (eqs. 13-14) -> ResidualAttentionDecoder (deep -> shallow: f̂_N..f̂_1)
    PromptLearner (eqs. 2-3) -> text features g_n^i, g_a^i
    FeatureNormalityPromotion (eqs. 5-8) on f_i and f̂_i -> f*_i, f̂*_i
    training: losses (eqs. 4, 9, 10, 11, 15, 16); inference: anomaly map (eq. 17)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from timm.models import named_apply
from timm.models.vision_transformer import init_weights_vit_timm
from torch import Tensor, nn

from cncad.config import CNCConfig
from cncad.encoders.clip import CLIPEncoder, clip_bpe_tokenizer, load_clip
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
    """Everything one forward pass of :class:`CNCModel` produces.

    Attributes:
        encoded: Per tapped layer, shallow to deep, the encoded patch tokens ``(B, L, C)``,
            promoted (f*_i, eq. 5) when CNC is on, raw (f_i) otherwise.
        decoded: The matching decoded patch tokens ``(B, L, C)`` (f̂*_i, eq. 8, or f̂_i).
        encoded_global: ``(B, N, D)`` unit global features e_i of the encoder, or None
            without CNC.
        decoded_global: ``(B, N, D)`` unit global features ê_i of the decoder, or None.
        text_normal: ``(N, D)`` normal text features g_n^i, or None.
        text_abnormal: ``(N, D)`` abnormal text features g_a^i, or None.
        gates: ``(R, T)`` router distribution over all R = B * (1 + L) tokens, or None
            without MoE.
    """

    encoded: list[Tensor]
    decoded: list[Tensor]
    encoded_global: Tensor | None
    decoded_global: Tensor | None
    text_normal: Tensor | None
    text_abnormal: Tensor | None
    gates: Tensor | None


class CNCModel(nn.Module):
    """The CNC model as one ``nn.Module``, usable without :class:`cncad.CNCDetector`.

    Args:
        config: Model, loss and scoring settings (optimisation fields are not used here).
        clip_model: An open_clip model to use instead of loading ``config.backbone``.
        tokenizer: Its tokenizer (needed with ``clip_model`` when CNC is on; defaults to
            the standard CLIP BPE tokenizer).

    Shapes:
        forward: ``(B, 3, S, S)`` normalised images, ``S = config.image_size`` ->
        :class:`CNCOutput`.
    """

    frozen_prefixes = ("encoder.", "prompt_learner.text_tower.")
    """State-dict prefixes of the frozen CLIP weights, which are never saved."""

    def __init__(
        self,
        config: CNCConfig | None = None,
        clip_model: nn.Module | None = None,
        tokenizer: Callable[[list[str]], Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.config = config = config or CNCConfig()
        if clip_model is None:
            clip_model, tokenizer = load_clip(config.backbone, config.pretrained)
        elif tokenizer is None:
            tokenizer = clip_bpe_tokenizer()
        self.encoder = CLIPEncoder(
            clip_model,
            image_size=config.image_size,
            layers=config.layers,
            num_taps=config.num_taps,
            with_text=config.use_cnc,
        )
        width, num_layers = self.encoder.width, len(self.encoder.layers)

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
            MultiLayerFusion([width] * num_layers, width, config.fusion_dropout)
            if config.use_mlf
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
            width, self.encoder.num_heads, depth=num_layers, mlp_ratio=config.decoder_mlp_ratio
        )
        for module in (self.fusion, self.moe, self.decoder):
            if module is not None:
                named_apply(init_weights_vit_timm, module)

    @property
    def layers(self) -> tuple[int, ...]:
        """1-based indices of the tapped encoder blocks."""
        return self.encoder.layers

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters CNC trains: prompts, fusion, MoE and decoder."""
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """State dict without the frozen CLIP weights (what a saved detector holds)."""
        return {
            key: value
            for key, value in self.state_dict().items()
            if not key.startswith(self.frozen_prefixes)
        }

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load :meth:`trainable_state_dict` output; anything missing or extra is an error."""
        expected = set(self.trainable_state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(
                "weights do not fit this model configuration: "
                f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        self.load_state_dict(state, strict=False)

    def forward(self, images: Tensor) -> CNCOutput:
        """Encode, decode and promote the features of ``images``."""
        features = self.encoder(images)
        layer_tokens = [
            torch.cat([cls.unsqueeze(1), patches], dim=1)
            for cls, patches in zip(features.class_tokens, features.patch_tokens, strict=True)
        ]  # (B, 1 + L, C) each
        noisy = [self.noise(tokens) for tokens in layer_tokens]
        student_input = self.fusion(noisy) if self.fusion is not None else noisy[-1]
        gates = None
        if self.moe is not None:
            student_input, gates, _ = self.moe(student_input)
        decoded_tokens = self.decoder(student_input)[::-1]  # block j rebuilds layer N + 1 - j

        encoded = list(features.patch_tokens)
        decoded = [tokens[:, 1:] for tokens in decoded_tokens]
        if self.prompt_learner is None:
            return CNCOutput(encoded, decoded, None, None, None, None, gates)

        text_normal, text_abnormal = self.prompt_learner()
        encoded = [
            self.promotion(f, self.encoder.project(f), text_normal[i], text_abnormal[i])
            for i, f in enumerate(encoded)
        ]
        decoded = [
            self.promotion(f, self.encoder.project(f), text_normal[i], text_abnormal[i])
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

    def loss(self, output: CNCOutput, epoch: int) -> LossTerms:
        """All loss terms of one batch (eqs. 4, 9, 10, 11, 15, 16).

        Args:
            output: The forward output in training mode.
            epoch: The 0-based epoch, for the schedule of eq. 11.

        Returns:
            :class:`cncad.losses.LossTerms`; switched-off components contribute zeros.
        """
        cfg = self.config
        distill = distillation_loss(output.encoded, output.decoded)
        zero = distill.new_zeros(())
        if output.text_normal is not None:
            align_enc = alignment_loss(
                output.encoded_global, output.text_normal, output.text_abnormal, cfg.tau
            )
            align_dec = alignment_loss(
                output.decoded_global, output.text_normal, output.text_abnormal, cfg.tau
            )
            constraint = constraint_loss(align_enc, align_dec, epoch, cfg.gamma, cfg.theta)
        else:
            align_enc = align_dec = constraint = zero
        moe = zero
        if output.gates is not None:
            moe = cfg.moe_loss_weight * importance_loss(output.gates, cfg.moe_loss_eps)
        return LossTerms(
            total_loss(distill, constraint, moe), distill, constraint, align_enc, align_dec, moe
        )

    @torch.no_grad()
    def predict(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Anomaly maps and image scores at the model resolution (eq. 17).

        Args:
            images: ``(B, 3, S, S)`` normalised images.

        Returns:
            ``(maps, scores)``: ``(B, S, S)`` float32 maps and ``(B,)`` image scores.
        """
        output = self(images)
        maps = anomaly_map(
            output.encoded, output.decoded, self.config.image_size, sigma=self.config.sigma
        )
        k = self.config.topk
        k = int(k) if k >= 1 else float(k)
        return maps, image_score(maps, mode=self.config.image_score, k=k)
