"""Model configuration as data: every size, the LLM architecture, token ids, loop count and preprocessing.

`R1Seg3DConfig` is what a checkpoint folder's `config.json` holds; presets are plain instances of it.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError, InvalidInputError

CONFIG_NAME = "config.json"
FORMAT_VERSION = 1
MAX_REFINE_LOOPS = 3


@dataclass
class EncoderConfig:
    image_size: tuple[int, int, int] = (32, 256, 256)   # window (D, H, W) voxels
    patch_size: tuple[int, int, int] = (4, 16, 16)
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072


@dataclass
class DecoderConfig:
    transformer_depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 2048
    iou_head_hidden: int = 256
    num_multimask_outputs: int = 3
    mask_in_chans: int = 16
    attention_downsample_rate: int = 2


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.1
    # "all-linear" = every Linear of the LLM's decoder layers (the original's choice); or a list of module names.
    target_modules: str | list[str] = "all-linear"


@dataclass
class LanguageModelConfig:
    # A Hugging Face config dict (with "model_type") for a randomly initialised LLM, or None when `path` is set.
    hf_config: dict | None = None
    # A local Hugging Face folder with the base LLM (and its tokenizer); weights are read from there.
    path: str | None = None
    # Or base weights shipped inside an installed Python package (model/packaged.py): module, file, sha256, install.
    package: dict | None = None
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class TextEncoderConfig:
    """Frozen text encoder of the SAM mode (stage 1 and the 'without reasoning' ablation)."""
    hf_config: dict | None = None
    path: str | None = None
    package: dict | None = None          # as LanguageModelConfig.package
    prompt_template: str = "A computerized tomography of a {}."


@dataclass
class CompatibilityConfig:
    """Switches that reproduce the original code's behaviour, for converted checkpoints and comparisons."""
    # "before": the hidden state of the token preceding each [SEG] (the state that predicts it; the original).
    # "at": the hidden state at the [SEG] token itself.
    seg_state: str = "before"
    # The original averaged several [SEG] states into one prompt; the project gives one mask per [SEG].
    average_seg_states: bool = False
    # "by_id": visual tokens go where the <im_patch> ids are. "after_bos": positions 1..N whatever the ids are
    # (the original; wrong for tokenizers without BOS).
    image_insertion: str = "by_id"
    # The original never saw a [SEG] emitted as the very first generated token.
    first_generated_seg_visible: bool = True


@dataclass
class LossConfig:
    lm: float = 1.0
    dice: float = 1.0
    bce: float = 1.0


@dataclass
class R1Seg3DConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    language_model: LanguageModelConfig | None = field(default_factory=LanguageModelConfig)
    text_encoder: TextEncoderConfig | None = None
    compatibility: CompatibilityConfig = field(default_factory=CompatibilityConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    projector_pool: int = 2
    segment_projector_dropout: float = 0.1
    refine_loops: int = 2
    preprocess: dict = field(default_factory=lambda: {"spacing_zyx": [2.0, 1.0, 1.0], "hu_min": -1000.0, "hu_max": 1000.0})
    token_ids: dict = field(default_factory=dict)     # filled from the tokenizer: image, seg, eos, pad, bos
    max_answer_tokens: int = 48
    card: dict = field(default_factory=dict)          # provenance shown by `r1seg info`: name, trained, source...
    format_version: int = FORMAT_VERSION
    # The canonical vocabulary names the model was trained to segment. A question about any other structure is
    # answered "not trained" without running the model; None (folders written before the field): no such list.
    known_structures: list[str] | None = None
    # The fused mask volume (mL) under which a target counts as absent: one number for every target, or one per
    # canonical name (names left out have none). None: any voxel counts as present. Set on training patients.
    presence_min_ml: float | dict[str, float] | None = None

    def validate(self) -> "R1Seg3DConfig":
        if not 0 <= self.refine_loops <= MAX_REFINE_LOOPS:
            raise InvalidInputError(f"refine_loops must be between 0 and {MAX_REFINE_LOOPS}; got {self.refine_loops}")
        if self.compatibility.seg_state not in ("before", "at"):
            raise InvalidInputError(f"compatibility.seg_state must be 'before' or 'at'; got {self.compatibility.seg_state!r}")
        if self.compatibility.image_insertion not in ("by_id", "after_bos"):
            raise InvalidInputError(f"compatibility.image_insertion must be 'by_id' or 'after_bos'; got {self.compatibility.image_insertion!r}")
        grid = [s // p for s, p in zip(self.encoder.image_size, self.encoder.patch_size)]
        if any(g % self.projector_pool for g in grid):
            raise InvalidInputError(f"the token grid {grid} is not divisible by the projector pooling {self.projector_pool}")
        if self.encoder.hidden_size % 8:
            raise InvalidInputError("the encoder hidden size must be a multiple of 8 (the decoder upscales to hidden/8 channels)")
        if self.language_model is None and self.text_encoder is None:
            raise InvalidInputError("a model needs a language model (R1Seg3D) or a text encoder (SAM mode)")
        if self.known_structures is not None and (
                not isinstance(self.known_structures, list) or not self.known_structures
                or not all(isinstance(name, str) and name for name in self.known_structures)):
            raise InvalidInputError("known_structures must be a non-empty list of canonical structure names, or null; "
                                    f"got {self.known_structures!r}")
        _check_presence_min_ml(self.presence_min_ml)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "R1Seg3DConfig":
        try:
            lm = data.get("language_model")
            te = data.get("text_encoder")
            config = cls(
                encoder=EncoderConfig(**_tuples(data.get("encoder", {}))),
                decoder=DecoderConfig(**data.get("decoder", {})),
                language_model=None if lm is None else LanguageModelConfig(
                    hf_config=lm.get("hf_config"), path=lm.get("path"), package=lm.get("package"),
                    lora=LoraConfig(**lm.get("lora", {}))),
                text_encoder=None if te is None else TextEncoderConfig(**te),
                compatibility=CompatibilityConfig(**data.get("compatibility", {})),
                loss=LossConfig(**data.get("loss", {})),
                **{k: v for k, v in data.items() if k in _SCALAR_FIELDS},
            )
        except TypeError as error:
            raise CheckpointError(f"config does not match R1Seg3DConfig: {error}") from error
        return config.validate()

    def save(self, folder: Path) -> Path:
        path = Path(folder) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return path

    @classmethod
    def load(cls, folder: Path) -> "R1Seg3DConfig":
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: not an R1Seg3D model folder")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{path} is not valid JSON: {error}") from error
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{path} was written by a newer R1Seg3D (format {data['format_version']})")
        return cls.from_dict(data)


_SCALAR_FIELDS = {"projector_pool", "segment_projector_dropout", "refine_loops", "preprocess", "token_ids",
                  "max_answer_tokens", "card", "format_version", "known_structures", "presence_min_ml"}


def _check_presence_min_ml(value) -> None:
    def is_volume(number) -> bool:
        return isinstance(number, (int, float)) and not isinstance(number, bool) and number >= 0

    if value is None or is_volume(value):
        return
    if isinstance(value, dict) and all(isinstance(k, str) and is_volume(v) for k, v in value.items()):
        return
    raise InvalidInputError("presence_min_ml must be a volume in mL >= 0, a map from structure name to such a volume, "
                            f"or null; got {value!r}")


def _tuples(encoder: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in encoder.items()}
