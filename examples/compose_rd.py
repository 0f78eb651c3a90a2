"""Compose your own: CNC's building blocks inside a reverse-distillation model on a timm CNN.

CNC (Wang et al., AAAI 2025) adds three things to a reverse-distillation (RD) model:
learned normal/abnormal text prompts (``PromptLearner``), a text-driven shift of the
compared features (``FeatureNormalityPromotion``, FNP) with an alignment constraint on the
decoder, and a gated mixture of experts in the bottleneck (``GatedMoE`` with
``importance_loss``). ``cncad.CNCModel`` wires them around a frozen CLIP ViT. This example
wires the same public pieces around a frozen **timm CNN** instead, built with timm
directly, to show that each piece is an ordinary ``nn.Module`` or function:

    images -> frozen ResNet-18 (3 pyramid levels)          teacher, no gradient
           -> pool to one grid -> FeatureNoise -> MultiLayerFusion (eq. 12)
           -> GatedMoE (eqs. 13-14) -> ResidualAttentionDecoder -> per-level heads
           -> upsample to each level's grid                 student, trained
    PromptLearner (eqs. 2-3) -> g_n, g_a per level
    FNP (eqs. 5, 8) on teacher and student tokens; losses eqs. 4, 9-11, 15
    anomaly_map (eq. 17) -> image_score

What differs from CNC, honestly: CLIP's image and text towers share a pretrained joint
space, so CNC compares image tokens with text features through CLIP's own frozen ``proj``.
A CNN has no such space, so here a **learned** linear map per level takes CNN features to
the text width, trained by the alignment losses (eqs. 4, 10) on normal images only. The
prompts then learn what "normal" looks like in that learned space, which is a weaker
anchor than CLIP's. Everything runs with random weights (``pretrained=False`` and the tiny
random CLIP text tower), so it trains and scores offline in seconds; the numbers it prints
test the plumbing, not the method.

    python examples/compose_rd.py --epochs 2
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cncad.data import AnomalyFolder, make_synthetic_dataset
from cncad.encoders.clip import CLIPTextTower, build_tiny_clip, clip_bpe_tokenizer
from cncad.losses import alignment_loss, constraint_loss, distillation_loss
from cncad.metrics import image_auroc, pixel_auroc
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


class RDOutput(NamedTuple):
    """One forward pass of :class:`CNNReverseDistillation`.

    Attributes:
        encoded: Per level, the promoted teacher tokens f*_i ``(B, L_i, C_i)``.
        decoded: Per level, the promoted student tokens f̂*_i ``(B, L_i, C_i)``.
        encoded_global: ``(B, N, D)`` unit global features e_i of the teacher.
        decoded_global: ``(B, N, D)`` unit global features ê_i of the student.
        text_normal: ``(N, D)`` normal text features g_n^i.
        text_abnormal: ``(N, D)`` abnormal text features g_a^i.
        gates: ``(R, T)`` the router's distribution over all R tokens.
    """

    encoded: list[Tensor]
    decoded: list[Tensor]
    encoded_global: Tensor
    decoded_global: Tensor
    text_normal: Tensor
    text_abnormal: Tensor
    gates: Tensor


def to_tokens(feature_map: Tensor) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, H * W, C)``, row-major, as ``anomaly_map`` expects."""
    return feature_map.flatten(2).transpose(1, 2)


class CNNReverseDistillation(nn.Module):
    """A reverse-distillation model on a frozen timm CNN, with CNC's constraint and MoE.

    Args:
        encoder_name: A timm model name with ``features_only`` support.
        out_indices: The pyramid levels to tap (timm ``feature_info`` indices).
        width: Token width of fusion, MoE and decoder.
        num_heads: Attention heads of the decoder blocks.
        num_experts: T, the number of MoE experts.
        top_k: K, experts per token.
        prompt_length: Learnable context vectors per prompt (the paper uses 12).
    """

    def __init__(
        self,
        encoder_name: str = "resnet18",
        out_indices: Sequence[int] = (1, 2, 3),
        width: int = 128,
        num_heads: int = 4,
        num_experts: int = 4,
        top_k: int = 2,
        prompt_length: int = 4,
    ) -> None:
        super().__init__()
        # Teacher: a frozen CNN pyramid. Random weights keep the example offline; use
        # pretrained=True (ImageNet weights from the hub) for real work.
        self.encoder = timm.create_model(
            encoder_name, pretrained=False, features_only=True, out_indices=tuple(out_indices)
        )
        self.encoder.requires_grad_(False).eval()
        channels = tuple(self.encoder.feature_info.channels())
        num_levels = len(channels)

        # Text side: the frozen text transformer of cncad's tiny random CLIP and CLIP's BPE
        # tokenizer (both offline). PromptLearner owns one learnable normal/abnormal prompt
        # pair per level and encodes all of them in one batch (eqs. 2-3).
        clip = build_tiny_clip()
        text_dim = clip.text_projection.shape[1]
        self.prompts = PromptLearner(
            CLIPTextTower(clip), clip_bpe_tokenizer(), num_levels, prompt_length=prompt_length
        )
        # The bridge a CNN lacks: a learned linear map per level from its channels into the
        # text space, where α and β of eq. 7 and the global features of eqs. 4, 10 live.
        self.to_text = nn.ModuleList(nn.Linear(c, text_dim) for c in channels)
        # FNP (eqs. 5, 8) has no weights: the same map is applied to teacher and student.
        self.promotion = FeatureNormalityPromotion()

        # Student: noise on the teacher tokens, fusion of the levels into one token
        # sequence (eq. 12), the gated MoE (eqs. 13-14), then one decoder block per level,
        # deep to shallow, and a linear head back to each level's width.
        self.noise = FeatureNoise(std=0.1)
        self.fusion = MultiLayerFusion(channels, width)
        self.moe = GatedMoE(width, num_experts=num_experts, top_k=top_k)
        self.decoder = ResidualAttentionDecoder(width, num_heads, depth=num_levels)
        self.heads = nn.ModuleList(nn.Linear(width, c) for c in channels)

    def train(self, mode: bool = True) -> CNNReverseDistillation:
        """Set the mode of the student; the teacher stays in eval mode (frozen BatchNorm)."""
        super().train(mode)
        self.encoder.eval()
        return self

    @torch.no_grad()
    def encode(self, images: Tensor) -> list[Tensor]:
        """The teacher's feature maps ``(B, C_i, H_i, W_i)``, shallow to deep."""
        return self.encoder(images)

    def forward(self, images: Tensor) -> RDOutput:
        """Decode the teacher's features and promote both sides with the text features."""
        maps = self.encode(images)
        grid = maps[-1].shape[-2:]  # fuse and decode on the coarsest level's grid
        pooled = [to_tokens(F.adaptive_avg_pool2d(m, grid)) for m in maps]  # (B, L, C_i)
        fused = self.fusion([self.noise(tokens) for tokens in pooled])  # eq. 12
        mixed, gates, _ = self.moe(fused)  # eqs. 13-14; gates feed importance_loss
        # Block j rebuilds level N + 1 - j, so reverse to get shallow-to-deep order.
        decoded_tokens = self.decoder(mixed)[::-1]

        encoded, decoded = [], []
        for level, (feature_map, tokens) in enumerate(zip(maps, decoded_tokens, strict=True)):
            b, c, h, w = feature_map.shape
            student = self.heads[level](tokens).transpose(1, 2).reshape(b, c, *grid)
            student = F.interpolate(student, size=(h, w), mode="bilinear", align_corners=False)
            encoded.append(to_tokens(feature_map))  # f_i, on the level's own grid
            decoded.append(to_tokens(student))  # f̂_i, same shape

        text_normal, text_abnormal = self.prompts()  # (N, D) each, unit norm
        promoted_encoded = [
            self.promotion(f, self.to_text[i](f), text_normal[i], text_abnormal[i])  # eq. 5
            for i, f in enumerate(encoded)
        ]
        promoted_decoded = [
            self.promotion(f, self.to_text[i](f), text_normal[i], text_abnormal[i])  # eq. 8
            for i, f in enumerate(decoded)
        ]
        return RDOutput(
            promoted_encoded,
            promoted_decoded,
            self.global_features(encoded),
            self.global_features(decoded),
            text_normal,
            text_abnormal,
            gates,
        )

    def global_features(self, tokens: Sequence[Tensor]) -> Tensor:
        """Unit global features ``(B, N, D)`` of per-level tokens, in the text space.

        CLIP's class token has no counterpart in a CNN: the mean token of each level stands
        in for it, mapped by the same learned projection as the tokens (e_i of eq. 4 for
        the teacher, ê_i of eq. 10 for the student).
        """
        pooled = [proj(f.mean(dim=1)) for proj, f in zip(self.to_text, tokens, strict=True)]
        return F.normalize(torch.stack(pooled, dim=1), dim=-1)

    def loss(self, out: RDOutput, epoch: int, gamma: float = 0.1, theta: int = 1) -> Tensor:
        """L_total = L_distill + L_constraint + L_moe (eq. 16).

        The student's alignment term joins at epoch ``theta`` (eq. 11; the paper uses
        ϑ = 5 of 250 epochs, this short demo 1) with weight ``gamma``.
        """
        distill = distillation_loss(out.encoded, out.decoded)  # eq. 9
        align_teacher = alignment_loss(out.encoded_global, out.text_normal, out.text_abnormal)
        align_student = alignment_loss(out.decoded_global, out.text_normal, out.text_abnormal)
        constraint = constraint_loss(align_teacher, align_student, epoch, gamma, theta)  # eq. 11
        return distill + constraint + importance_loss(out.gates)  # eq. 15

    @torch.no_grad()
    def predict(self, images: Tensor, sigma: float = 2.0) -> tuple[Tensor, Tensor]:
        """Anomaly maps ``(B, S, S)`` at the input size and image scores ``(B,)`` (eq. 17)."""
        out = self(images)
        maps = anomaly_map(out.encoded, out.decoded, out_size=images.shape[-1], sigma=sigma)
        return maps, image_score(maps, mode="max")


def main(argv: Sequence[str] | None = None) -> None:
    """Train the composed model for a few epochs on synthetic data and score its test set."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--encoder", default="resnet18", help="timm model name")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory(prefix="cncad-compose-") as tmp:
        root = make_synthetic_dataset(Path(tmp) / "data", n_train=16, image_size=args.image_size)
        # AnomalyFolder resizes and normalises with CLIP's mean/std, close to ImageNet's.
        train = DataLoader(
            AnomalyFolder(root, "train", args.image_size), batch_size=8, shuffle=True
        )
        test = DataLoader(AnomalyFolder(root, "test", args.image_size), batch_size=8)

        model = CNNReverseDistillation(args.encoder)
        trainable = [p for p in model.parameters() if p.requires_grad]
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        print(f"trainable parameters: {sum(p.numel() for p in trainable):,}, frozen: {frozen:,}")
        optimizer = torch.optim.Adam(trainable, lr=1e-3)

        for epoch in range(args.epochs):
            model.train()
            losses = []
            for batch in train:
                loss = model.loss(model(batch["image"]), epoch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            print(f"epoch {epoch}: mean loss {sum(losses) / len(losses):.4f} ({len(losses)} steps)")

        model.eval()  # the prompt features are now computed once and cached
        scores, labels, maps, masks = [], [], [], []
        for batch in test:
            batch_maps, batch_scores = model.predict(batch["image"])
            scores.append(batch_scores)
            labels.append(batch["label"])
            maps.append(batch_maps)
            masks.append(batch["mask"][:, 0])
        score, label = torch.cat(scores), torch.cat(labels)
        print(f"scored {len(score)} test images, maps {tuple(torch.cat(maps).shape)}")
        print(f"I-AUROC {image_auroc(score, label):.3f}")
        print(f"P-AUROC {pixel_auroc(torch.cat(maps), torch.cat(masks)):.3f}")


if __name__ == "__main__":
    main()
