"""Turning an original R1Seg-3D (or SegVol) weight file into a model folder of this project.

Steps, the same for every source type: read the file without running code from it, check that it is the layout
`--from` names, rename every key, build the target model on the `meta` device (no memory for weights) to know
the exact names and shapes expected, stop with a list of every missing, unexpected or mis-shaped key, then hand
the original tensors to the model (no copy, original dtype) and save it with `R1Seg3D.save_pretrained`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..config import EncoderConfig, LoraConfig, R1Seg3DConfig
from ..errors import CheckpointError
from ..model.builder import build_model
from ..model.image_encoder import ImageEncoder3D
from ..model.packaged import file_sha256
from ..prompting import IMAGE_TOKEN, SEG_TOKEN
from .keymaps import LORA, MERGED, PEFT_PREFIX, SAM, SEGVOL_VIT, SOURCE_KINDS, KeyMapping, detect_layout, llm_family, \
    lora_target_modules, map_keys
from .original_config import (ORIGINAL_COMMIT, ORIGINAL_REPOSITORY, ORIGINAL_SOURCE_URL, RELEASES, SEGVOL_REPOSITORY,
                              apply_config_file, apply_original_hf_config, family_of, published_config, read_json)
from .reading import SourceWeights, read_hf_folder, read_weight_file
from .segvol import ENCODER_PREFIX, write_encoder_start_point

# A converted LoRA checkpoint carries its own base LLM (stage 2-4 trained the embeddings and LM head, so no
# public LLM is its base); the model folder names it relative to itself.
BASE_LLM_DIR = "base_llm"
_EMBEDDING_KEY = "model.embed_tokens.weight"
_CLIP_EMBEDDING_KEY = "text_encoder.clip_text_model.text_model.embeddings.token_embedding.weight"
_SHOWN_KEYS = 12


@dataclass
class ConversionReport:
    kind: str
    source: Path
    destination: Path
    converted: int = 0
    unused: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    ignored_entries: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"converted {self.converted} tensors of {self.source} ({self.kind}) into {self.destination}"]
        if self.unused:
            lines.append(f"dropped {len(self.unused)} tensors the original never used: {', '.join(self.unused)}")
        if self.skipped:
            lines.append(f"left out {len(self.skipped)} tensors named by --skip-keys: {', '.join(self.skipped)}")
        if self.ignored_entries:
            lines.append(f"ignored non-weight entries of the checkpoint: {', '.join(self.ignored_entries)}")
        return "\n".join(lines + self.notes)


def convert(kind: str, source: Path, destination: Path, config_path: Path | None = None, tokenizer_path: Path | None = None,
            skip_keys: tuple[str, ...] = (), merge_lora: bool = False) -> ConversionReport:
    source, destination = Path(source), Path(destination)
    if kind not in SOURCE_KINDS:
        raise CheckpointError(f"unknown source type {kind!r}; choose one of {', '.join(SOURCE_KINDS)}")
    if merge_lora and kind != LORA:
        raise CheckpointError("--merge-lora applies to --from r1seg3d-lora only")
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise CheckpointError(f"destination {destination} is not empty; choose a new folder")
    weights = read_hf_folder(source) if kind == MERGED else read_weight_file(source)
    _check_layout(kind, weights, source)
    report = ConversionReport(kind, source, destination, ignored_entries=weights.ignored_entries)
    if kind == SEGVOL_VIT:
        return _convert_segvol(weights, destination, config_path, skip_keys, report)
    config, stated_seg_id, stated_in = target_config(kind, source, weights, config_path)
    tokenizer, text_tokenizer = _tokenizers(kind, source, tokenizer_path)
    _check_tokenizers(kind, tokenizer, text_tokenizer, weights, stated_seg_id, stated_in, source)
    model = build_skeleton(config, tokenizer, text_tokenizer, kind)
    mapping = map_keys(kind, weights.tensors, tuple(skip_keys), clip_inner_prefix(model))
    report.unused, report.skipped = mapping.unused, mapping.skipped
    model.config.card = _card(kind, weights, mapping, llm_family(weights.tensors) if kind != SAM else None, config.refine_loops)
    state = renamed_state(mapping, weights, model.state_dict(), kind, source)
    model.load_state_dict(state, strict=True, assign=True)
    report.converted = len(state)
    if kind == LORA and not merge_lora:
        _save_with_adapter(model, destination)
        report.notes.append(f"LoRA kept as an adapter (scaling alpha/r = {model.config.language_model.lora.alpha}/"
                            f"{model.config.language_model.lora.r}); its base LLM is in {destination / BASE_LLM_DIR}")
    else:
        model.save_pretrained(destination, merge_lora=True)
    return report


def _convert_segvol(weights: SourceWeights, destination: Path, config_path: Path | None, skip_keys,
                    report: ConversionReport) -> ConversionReport:
    sizes = published_config(SEGVOL_VIT)
    if config_path is not None:
        apply_config_file(sizes, Path(config_path))
    mapping = map_keys(SEGVOL_VIT, weights.tensors, tuple(skip_keys))
    report.unused, report.skipped = mapping.unused, mapping.skipped
    state = renamed_state(mapping, weights, encoder_skeleton(sizes.encoder), SEGVOL_VIT, report.source)
    write_encoder_start_point(destination, state, sizes.encoder, _card(SEGVOL_VIT, weights, mapping))
    report.converted = len(state)
    return report


def _check_layout(kind: str, weights: SourceWeights, source: Path) -> None:
    detected = detect_layout(weights.tensors)
    if detected == kind:
        return
    example = next(iter(weights.tensors), "(no tensors)")
    what = f"the layout of --from {detected}" if detected else "no published R1Seg-3D or SegVol layout"
    raise CheckpointError(f"{source} does not match --from {kind}: its keys (e.g. {example!r}) have {what}")


def target_config(kind: str, source: Path, weights: SourceWeights, config_path: Path | None):
    """The model config, and the [SEG] id the original config states (with the file that states it)."""
    family = llm_family(weights.tensors) if kind in (MERGED, LORA) else None
    stated_seg_id, stated_in = None, None
    original = source / "config.json"
    if kind == MERGED:
        data = read_json(original)
        family = family_of(data.get("model_type")) or family
        config = published_config(kind, family)
        apply_original_hf_config(config, data, original)
        stated_seg_id, stated_in = data.get("seg_token_id"), original
    else:
        config = published_config(kind, family)
    if config_path is not None:
        seg_id = apply_config_file(config, Path(config_path))
        if seg_id is not None:
            stated_seg_id, stated_in = seg_id, Path(config_path)
    embedding = weights.tensors.get(_embedding_key(kind))
    if embedding is not None:
        config.language_model.hf_config["vocab_size"] = embedding.shape[0]
    if kind == LORA:
        targets = lora_target_modules(weights.tensors)
        ranks = {weights.tensors[PEFT_PREFIX + t + ".lora_A.default.weight"].shape[0] for t in targets}
        if len(ranks) > 1:
            raise CheckpointError(f"{source}: the LoRA adapters have different ranks {sorted(ranks)}; one rank is supported")
        lora = config.language_model.lora
        config.language_model.lora = LoraConfig(r=ranks.pop() if ranks else lora.r, alpha=lora.alpha, dropout=lora.dropout,
                                                target_modules=targets)
    return config.validate(), stated_seg_id, stated_in


def _embedding_key(kind: str) -> str:
    return PEFT_PREFIX + _EMBEDDING_KEY if kind == LORA else _EMBEDDING_KEY


def _tokenizers(kind: str, source: Path, tokenizer_path: Path | None):
    """(LLM tokenizer, text-tower tokenizer); the original's files are loaded as they are, added tokens included."""
    from transformers import AutoTokenizer

    folder = Path(tokenizer_path) if tokenizer_path is not None else (source if kind == MERGED else None)
    if folder is None:
        needed = "the CLIP tokenizer (openai/clip-vit-base-patch32)" if kind == SAM else "the tokenizer of the matching release folder"
        raise CheckpointError(f"--from {kind} needs --tokenizer DIR: {needed}, since {source.name} stores weights only")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise CheckpointError(f"no usable tokenizer in {folder}: {error}") from error
    return (None, tokenizer) if kind == SAM else (tokenizer, None)


def _check_tokenizers(kind, tokenizer, text_tokenizer, weights: SourceWeights, stated_seg_id, stated_in, source: Path) -> None:
    """Token ids must be those the weights were trained with: same vocabulary size, same [SEG]."""
    if kind == SAM:
        rows = weights.tensors.get(_CLIP_EMBEDDING_KEY)
        if rows is not None and len(text_tokenizer) != rows.shape[0]:
            raise CheckpointError(f"the CLIP tokenizer has {len(text_tokenizer)} entries but {_CLIP_EMBEDDING_KEY} in {source} "
                                  f"has {rows.shape[0]} rows: it is not the tokenizer of these weights")
        return
    vocab = tokenizer.get_vocab()
    name = getattr(tokenizer, "name_or_path", "")
    for token in (IMAGE_TOKEN, SEG_TOKEN):
        if token not in vocab:
            raise CheckpointError(f"the tokenizer in {name} has no {token} token: it is not the tokenizer saved with these weights")
    key = _embedding_key(kind)
    embedding = weights.tensors.get(key)
    if embedding is not None and len(tokenizer) != embedding.shape[0]:
        raise CheckpointError(f"the tokenizer in {name} has {len(tokenizer)} entries but {key} in {source} has "
                              f"{embedding.shape[0]} rows: its token ids do not match the weights")
    if stated_seg_id is not None and vocab[SEG_TOKEN] != stated_seg_id:
        raise CheckpointError(f"the tokenizer in {name} gives {SEG_TOKEN} the id {vocab[SEG_TOKEN]} but {stated_in} "
                              f"says seg_token_id = {stated_seg_id}: tokenizer and weights do not belong together")


def build_skeleton(config: R1Seg3DConfig, tokenizer, text_tokenizer, kind: str):
    """The target model with shapes but no storage; `assign` loading later gives it the original tensors."""
    with torch.device("meta"):
        model = build_model(config, tokenizer=tokenizer, text_tokenizer=text_tokenizer)
        if kind == LORA:
            model.language_model.enable_lora(config.language_model.lora)
    return model


def clip_inner_prefix(model) -> str:
    """Where the installed transformers puts the CLIP text layers inside CLIPTextModel (see keymaps)."""
    return "text_model." if model.text_encoder is not None and hasattr(model.text_encoder.text_model, "text_model") else ""


def encoder_skeleton(encoder: EncoderConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        module = ImageEncoder3D(encoder.image_size, encoder.patch_size, encoder.hidden_size, encoder.depth,
                                encoder.num_heads, encoder.mlp_dim)
    return {ENCODER_PREFIX + k: v for k, v in module.state_dict().items()}


def renamed_state(mapping: KeyMapping, weights: SourceWeights, expected: dict, kind: str, source: Path) -> dict:
    """The renamed tensors, after checking them name by name against the target model; every problem is listed."""
    renamed_to = {new: old for old, new in mapping.renamed.items()}
    unexpected = list(mapping.unknown) + [old for old, new in mapping.renamed.items() if new not in expected]
    missing = [new for new in expected if new not in renamed_to]
    mismatched = [f"{old} (as {new}): file {tuple(weights.tensors[old].shape)} vs config {tuple(expected[new].shape)}"
                  for new, old in renamed_to.items()
                  if new in expected and tuple(weights.tensors[old].shape) != tuple(expected[new].shape)]
    problems = []
    for label, items in (("unexpected keys (no place in the target model)", unexpected),
                         ("missing keys (the target model needs them, the file lacks them)", missing),
                         ("size mismatches (the file disagrees with the configured sizes)", mismatched)):
        if items:
            shown = "; ".join(items[:_SHOWN_KEYS]) + (f"; ... (+{len(items) - _SHOWN_KEYS} more)" if len(items) > _SHOWN_KEYS else "")
            problems.append(f"{len(items)} {label}: {shown}")
    if problems:
        hint = " Pass --skip-keys NAME_OR_GLOB to leave out unexpected keys on purpose." if unexpected else ""
        raise CheckpointError(f"{source} cannot be converted as {kind}:\n  " + "\n  ".join(problems) + hint)
    return {new: weights.tensors[old] for new, old in renamed_to.items()}


def _save_with_adapter(model, destination: Path) -> None:
    """Model folder with `adapter/` (PEFT) plus the base LLM the adapter applies to, in `base_llm/`."""
    model.config.language_model.path = BASE_LLM_DIR
    model.save_pretrained(destination, merge_lora=False)
    # Removing the LoRA layers without merging gives back the base weights as the original file holds them.
    base = model.language_model.llm.unload()
    base.save_pretrained(destination / BASE_LLM_DIR)
    model.tokenizer.save_pretrained(destination / BASE_LLM_DIR)


def _card(kind: str, weights: SourceWeights, mapping: KeyMapping, family: str | None = None, refine_loops: int = 0) -> dict:
    """Provenance for `r1seg info`: where the weights come from, when they were converted, what was dropped."""
    original = [{"file": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)} for path in weights.files]
    common = dict(converted_on=datetime.now(timezone.utc).isoformat(timespec="seconds"), conversion=f"r1seg convert --from {kind}",
                  original_files=original, dropped_unused_keys=mapping.unused, skipped_keys=mapping.skipped)
    if kind == SEGVOL_VIT:
        return dict(name="SegVol pretrained ViT (encoder start point)",
                    description="Self-supervised SegVol ViT, the encoder the original R1Seg-3D stage 1 starts from.",
                    source=f"https://github.com/{SEGVOL_REPOSITORY}", release=RELEASES[SEGVOL_VIT],
                    licence=f"see {SEGVOL_REPOSITORY}", **common)
    release = RELEASES[SAM] if kind == SAM else RELEASES.get((family, MERGED), "unpublished")
    if kind == SAM:
        description = ("Stage-1 segmentation model prompted by a frozen CLIP text tower ('A computerized tomography of "
                       f"a {{}}.'); {refine_loops} refinement loops by default.")
    else:
        description = ("Runs with the original behaviour by default: visual tokens after BOS, several [SEG] averaged into "
                       f"one mask, a [SEG] generated as the first token not seen, {refine_loops} refinement loops. Change "
                       "`compatibility` in config.json for this project's behaviour (visual tokens by id, one mask per "
                       "[SEG], first [SEG] seen). `r1seg ask` runs it with the `original` inference profile (the "
                       "original's preprocessing, window fusion and generated answers); the tensors match the original "
                       "code, the authors' reported numbers were not reproduced here.")
    name = {SAM: "R1Seg-3D-SAM (stage 1)", MERGED: "R1Seg-3D", LORA: "R1Seg-3D (stage 3/4 LoRA checkpoint)"}[kind]
    return dict(name=f"{name}, converted", description=description,
                source=ORIGINAL_SOURCE_URL, source_commit=ORIGINAL_COMMIT, release=release,
                licence=f"none stated: {ORIGINAL_REPOSITORY} has no LICENSE file; ask the authors before redistributing",
                **common)
