"""R1Seg3D (Fig. 2): encoder -> projector -> LLM -> [SEG] -> segment projector -> prompt encoder -> decoder, n loops.

The model holds the network and the method's rules (which hidden state is the [SEG] embedding, what the refinement
loop feeds back, the losses). Reading CTs, windows and answer handling live in `r1seg_core.inference`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import R1Seg3DConfig
from ..errors import InvalidInputError
from .image_encoder import ImageEncoder3D
from .language_model import LanguageModel
from .mask_decoder import MaskDecoder3D
from .projector import MultimodalProjector
from .prompt_encoder import PromptEncoder3D
from .segment_projector import SegmentProjector
from .text_encoder import TextEncoder
from .transformer import TwoWayTransformer

# The mask logits the original gives an answer without [SEG]: an empty mask, and a veto where windows are averaged.
NO_SEG_LOGIT = -1000.0


@dataclass
class SegmentationOutput:
    """Masks for a batch of prompts: final logits at window size and the low-res logits of every pass."""
    logits: torch.Tensor                      # (P, 1, D, H, W)
    low_res_passes: list[torch.Tensor]        # 1 + loops tensors of (P, 1, 4d, 4h, 4w)
    iou_passes: list[torch.Tensor] = field(default_factory=list)


@dataclass
class SegPrompts:
    """What the [SEG] rule gives: the chosen LLM states, their decoder prompts, and whose mask each one is."""
    hidden: torch.Tensor                      # (P, H) the [SEG] states (averaged per row when the switch says so)
    prompts: torch.Tensor | None              # (P, C) after the segment projector; None when P == 0
    rows: list[tuple[int, int]]               # (row, k): the k-th mask of that row


@dataclass
class R1Seg3DOutput:
    loss: torch.Tensor
    loss_lm: torch.Tensor
    loss_dice: torch.Tensor
    loss_bce: torch.Tensor
    hidden_states: torch.Tensor                       # (B, L, H) last layer, after the final norm
    seg_hidden: torch.Tensor | None                   # (P, H), one row per prompted mask
    seg_prompt: torch.Tensor | None                   # (P, C)
    prompt_rows: list[tuple[int, int]]                # (batch item, [SEG] index) of each prompted mask
    segmentation: SegmentationOutput | None
    visual_tokens: torch.Tensor | None = None
    image_tokens: torch.Tensor | None = None


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - (2 sum(p t) + 1) / (sum p + sum t + 1) per mask, averaged (the original's smoothing)."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1).to(p.dtype)
    return (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))


class R1Seg3D(nn.Module):
    def __init__(self, config: R1Seg3DConfig, language_model: LanguageModel | None = None, tokenizer=None,
                 text_encoder: TextEncoder | None = None, text_tokenizer=None):
        super().__init__()
        self.config = config.validate()
        enc, dec = config.encoder, config.decoder
        self.image_encoder = ImageEncoder3D(enc.image_size, enc.patch_size, enc.hidden_size, enc.depth, enc.num_heads, enc.mlp_dim)
        grid = self.image_encoder.grid
        self.prompt_encoder = PromptEncoder3D(enc.hidden_size, grid, dec.mask_in_chans)
        self.mask_decoder = MaskDecoder3D(
            enc.hidden_size, grid,
            TwoWayTransformer(dec.transformer_depth, enc.hidden_size, dec.num_heads, dec.mlp_dim, dec.attention_downsample_rate),
            dec.num_multimask_outputs, dec.iou_head_hidden)
        self.tokenizer = tokenizer
        self.text_tokenizer = text_tokenizer
        self.language_model = language_model
        if language_model is not None:
            self.projector = MultimodalProjector(enc.hidden_size, language_model.hidden_size, grid, config.projector_pool)
            self.segment_projector = SegmentProjector(language_model.hidden_size, enc.hidden_size, config.segment_projector_dropout)
        self.text_encoder = text_encoder

    # ---- the boxes of Fig. 2 -------------------------------------------------------------------------------

    @property
    def window_size(self) -> tuple[int, int, int]:
        return self.image_encoder.image_size

    @property
    def num_visual_tokens(self) -> int:
        return self.projector.num_visual_tokens

    @property
    def token_ids(self) -> dict:
        return self.config.token_ids

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B,1,D,H,W) windows in [0,1] -> encoder tokens (B,N,C), shared by the LLM path and the decoder."""
        return self.image_encoder(images)

    def embed_prompt_sequence(self, input_ids: torch.Tensor, visual_tokens: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed(input_ids, visual_tokens, self.token_ids["image"],
                                         self.config.compatibility.image_insertion)

    def decode_masks(self, image_tokens: torch.Tensor, prompts: torch.Tensor, loops: int | None = None,
                     traces: list[dict] | None = None) -> SegmentationOutput:
        """One decoder pass, then `loops` more that feed back the previous pass's raw low-res logits.

        image_tokens (P,N,C) and prompts (P,C) are paired row by row.
        """
        loops = self.config.refine_loops if loops is None else loops
        if not 0 <= loops <= 3:
            raise InvalidInputError(f"refinement loops must be between 0 and 3; got {loops}")
        image_embedding = self.image_encoder.tokens_to_grid(image_tokens)
        image_pe = self.prompt_encoder.dense_positional_encoding().to(image_embedding.dtype)
        low_res, passes, ious = None, [], []
        for _ in range(loops + 1):
            sparse, dense = self.prompt_encoder(prompts, low_res)
            trace = {} if traces is not None else None
            low_res, iou = self.mask_decoder(image_embedding, image_pe, sparse, dense, prompts, trace)
            if traces is not None:
                trace.update(sparse=sparse, dense=dense)
                traces.append(trace)
            passes.append(low_res)
            ious.append(iou)
        return SegmentationOutput(self.upsample(low_res), passes, ious)

    def upsample(self, low_res: torch.Tensor) -> torch.Tensor:
        return F.interpolate(low_res, size=self.window_size, mode="trilinear", align_corners=False)

    # ---- the [SEG] rule ------------------------------------------------------------------------------------

    def seg_prompts(self, token_ids: torch.Tensor, hidden: torch.Tensor, answer_start: int | None = None) -> SegPrompts:
        """The one [SEG] rule: token ids and their last-layer states in, one decoder prompt per mask out.

        Training, every inference path and `compat-run` call this, so the compatibility switches act in one place:
        - `seg_state`: "before" takes the state preceding each [SEG] (the one that predicts it; the original),
          "at" the state at the [SEG] itself;
        - `average_seg_states`: several [SEG] of a row become one mean prompt (the original) or one prompt each;
        - `first_generated_seg_visible`: with `answer_start` (the index of a generated answer's first token), a
          [SEG] generated first is dropped when False, as the original's generate never saw it. Without
          `answer_start` (teacher forcing) every [SEG] with a state before it counts, as in the original's training.
        token_ids (B, L) and hidden (B, L, H) are aligned: hidden[:, t] is the state after reading token t.
        """
        compat = self.config.compatibility
        shift = 1 if compat.seg_state == "before" else 0
        first = 0 if answer_start is None else answer_start + (0 if compat.first_generated_seg_visible else 1)
        states, rows = [], []
        for item, row in enumerate(token_ids == self.token_ids["seg"]):
            positions = [int(t) - shift for t in torch.nonzero(row).flatten() if int(t) >= first and int(t) - shift >= 0]
            if not positions:
                continue
            chosen = hidden[item, positions]
            if compat.average_seg_states:
                states.append(chosen.mean(0, keepdim=True))
                rows.append((item, 0))
            else:
                states.append(chosen)
                rows.extend((item, k) for k in range(len(positions)))
        if not rows:
            return SegPrompts(hidden.new_zeros(0, hidden.shape[-1]), None, [])
        seg_hidden = torch.cat(states)
        return SegPrompts(seg_hidden, self.segment_projector(seg_hidden), rows)

    # ---- training forward ----------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None, target_masks: torch.Tensor | None = None,
                loops: int | None = None, traces: list[dict] | None = None) -> R1Seg3DOutput:
        """Teacher-forced forward. target_masks (B,K,D,H,W): the mask of the k-th [SEG] of item b (zeros = no loss).

        LM cross-entropy on the answer tokens plus Dice and BCE on the masks whose target is present.
        """
        if self.language_model is None:
            raise InvalidInputError("this model has no language model (SAM mode): use segment_with_text")
        image_tokens = self.encode_images(images)
        visual = self.projector(image_tokens)
        embeds = self.embed_prompt_sequence(input_ids, visual)
        hidden, _ = self.language_model(embeds, attention_mask)
        loss_lm = self.lm_loss(hidden, labels) if labels is not None else hidden.new_zeros(())
        found = self.seg_prompts(input_ids, hidden)
        zero = hidden.new_zeros(())
        rows = found.rows
        if target_masks is not None:
            keep = [i for i, (b, k) in enumerate(rows) if k < target_masks.shape[1] and target_masks[b, k].any()]
        else:
            keep = list(range(len(rows)))
        seg_hidden, rows = found.hidden[keep], [rows[i] for i in keep]
        segmentation = seg_prompt = None
        loss_dice = loss_bce = zero
        if rows:
            seg_prompt = found.prompts[keep]
            items = torch.tensor([b for b, _ in rows], device=image_tokens.device)
            segmentation = self.decode_masks(image_tokens[items].to(seg_prompt.dtype), seg_prompt, loops, traces)
            if target_masks is not None:
                targets = torch.stack([target_masks[b, k] for b, k in rows]).unsqueeze(1)
                loss_dice = dice_loss(segmentation.logits, targets)
                loss_bce = bce_loss(segmentation.logits, targets)
        w = self.config.loss
        loss = w.lm * loss_lm + w.dice * loss_dice + w.bce * loss_bce
        return R1Seg3DOutput(loss, loss_lm, loss_dice, loss_bce, hidden, seg_hidden if rows else None, seg_prompt,
                             rows, segmentation, visual, image_tokens)

    def lm_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Causal-LM cross-entropy, computing logits only where a label follows (the vocabulary can be 150k wide)."""
        targets = labels[:, 1:]
        where = targets != -100
        if not where.any():
            return hidden.new_zeros(())
        logits = self.language_model.logits(hidden[:, :-1][where])
        return F.cross_entropy(logits, targets[where])

    # ---- SAM mode (stage 1, "without reasoning") -----------------------------------------------------------

    def text_prompts(self, target_names: list[str], device) -> torch.Tensor:
        """(P, C) decoder prompts from target names through the frozen text encoder (the template of stage 1)."""
        if self.text_encoder is None or self.text_tokenizer is None:
            raise InvalidInputError("this model has no text encoder: build it with a text_encoder config (SAM mode)")
        ids, mask = self.text_encoder.tokenize(self.text_tokenizer, target_names, device)
        return self.text_encoder(ids, mask)

    def segment_with_text(self, images: torch.Tensor, target_names: list[str], target_masks: torch.Tensor | None = None,
                          loops: int | None = None, traces: list[dict] | None = None,
                          rows: torch.Tensor | None = None):
        """Prompt the decoder with a frozen text encoder's embedding of each target name.

        `rows` (one image index per name) lets several targets share one encoder pass of their image; without it
        name i belongs to image i. Returns (SegmentationOutput, loss dict or None).
        """
        if rows is None:
            if len(target_names) != images.shape[0]:
                raise InvalidInputError(f"{images.shape[0]} images but {len(target_names)} target names")
            rows = torch.arange(images.shape[0], device=images.device)
        elif len(rows) != len(target_names):
            raise InvalidInputError(f"{len(target_names)} target names but {len(rows)} image rows")
        prompts = self.text_prompts(target_names, images.device)
        image_tokens = self.encode_images(images)
        segmentation = self.decode_masks(image_tokens[rows], prompts, loops, traces)
        if target_masks is None:
            return segmentation, None
        losses = {"loss_dice": dice_loss(segmentation.logits, target_masks), "loss_bce": bce_loss(segmentation.logits, target_masks)}
        losses["loss"] = self.config.loss.dice * losses["loss_dice"] + self.config.loss.bce * losses["loss_bce"]
        return segmentation, losses

    # ---- checkpoints ---------------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path, merge_lora: bool = True, max_shard_bytes: int = 2 * 1024 ** 3) -> Path:
        from .checkpoint import save_model
        return save_model(self, Path(folder), merge_lora=merge_lora, max_shard_bytes=max_shard_bytes)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> "R1Seg3D":
        from .checkpoint import load_model
        return load_model(Path(folder), device=device, dtype=dtype)
