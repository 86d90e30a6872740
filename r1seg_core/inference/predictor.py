"""Predictor.ask: a CT and a question in, the answer and one mask per target on the CT's own grid out.

The path of one question: Volume -> canonical grid (preprocess) -> windows -> R1Seg3D per window (encoder ->
projector -> LLM answer and [SEG] states -> segment projector -> decoder, n loops) -> Gaussian blending ->
back to the input grid -> AnswerResult. Windows go through every stage in batches; the answer is scored
against the model's answer templates (teacher forcing) or generated greedily, never sampled.
"""
from __future__ import annotations

import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import CancelledError, InvalidInputError, OutOfMemoryError
from ..preprocess import ModelGrid, PreprocessConfig, input_grid_tensor, model_space_tensor, resize_to_window
from ..prompting import (PER_TARGET_QUESTION, POSITIVE_ANSWER, answer_ids, negative_answer, positive_answer, prompt_ids,
                         targets_named_in_answer, validate_question)
from ..volume import Volume, read_volume, validate_ct
from .answers import WindowAnswers, greedy_decode, score_candidates
from .conversation import Conversation
from .result import AnswerResult, TargetResult
from .windows import WindowStitcher, extract_windows, gaussian_importance_map, pad_to_roi, window_region, window_starts

ANSWER_MODES = ("constrained", "generate")
GLOBAL_STEP_MODES = ("off", "answer", "skip")
UNNAMED_TARGET = "target"
# A window is skipped by the global step when the coarse whole-CT mask has no voxel above this in it.
SKIP_THRESHOLD = 0.1
# Encoder outputs kept for follow-up questions about the same CT (126 Phi-3-size windows take about 0.6 GB).
WINDOW_CACHE_BYTES = 2 * 1024 ** 3


@dataclass
class AskOptions:
    overlap: float = 0.25
    loops: int | None = None              # None: the checkpoint's refine_loops
    window_batch: int | None = None       # None: 16 on a GPU, 4 on the CPU
    answer_mode: str = "constrained"
    global_step: str = "answer"
    keep_probability: bool = False
    threshold: float = 0.5

    def validate(self) -> "AskOptions":
        if not 0.0 <= self.overlap < 1.0:
            raise InvalidInputError(f"window overlap must be in [0, 1); got {self.overlap}")
        if self.loops is not None and not 0 <= self.loops <= 3:
            raise InvalidInputError(f"refinement loops must be between 0 and 3; got {self.loops}")
        if self.window_batch is not None and self.window_batch < 1:
            raise InvalidInputError(f"window batch must be at least 1; got {self.window_batch}")
        if self.answer_mode not in ANSWER_MODES:
            raise InvalidInputError(f"answer mode must be one of {ANSWER_MODES}; got {self.answer_mode!r}")
        if self.global_step not in GLOBAL_STEP_MODES:
            raise InvalidInputError(f"global step must be one of {GLOBAL_STEP_MODES}; got {self.global_step!r}")
        return self


@dataclass
class CTCache:
    """What the predictor keeps about the CT it last answered a question on."""
    key: bytes
    grid: ModelGrid | None = None                    # the canonical grid the CT was resampled to
    padded: tuple | None = None                      # (its voxels there padded to a window, on the device; crop back)
    windows: dict = field(default_factory=dict)      # window start -> (encoder tokens, visual tokens)
    whole_ct: tuple | None = None                    # the global step's (encoder tokens, visual tokens)


def volume_fingerprint(volume: Volume) -> bytes:
    """Voxels and geometry: the same CT handed over again (e.g. from Slicer) is recognised, an edited one is not.

    The voxels' CRC-32 is paid on every question, at a tenth of a cryptographic hash's cost: it catches every edit
    of one voxel and misses a larger edit with probability 2**-32, and nobody gains by forging a CT against their
    own cache. The geometry is compared as it is.
    """
    voxels = np.ascontiguousarray(volume.array).view(np.uint8).reshape(-1)
    geometry = str((volume.array.dtype, volume.array.shape, volume.spacing, volume.origin)).encode()
    return zlib.crc32(voxels).to_bytes(4, "little") + geometry + np.asarray(volume.direction, dtype=np.float64).tobytes()


@dataclass
class Query:
    """One text the LLM answers per window, and which targets its [SEG] tokens stand for."""
    prompt: list[int]
    candidates: list[list[int]]
    target_indices: list[int]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# What torch's CPU allocator and SimpleITK say when an allocation fails (both raise a plain RuntimeError).
CPU_OUT_OF_MEMORY_SIGNS = ("can't allocate memory", "Failed to allocate memory")


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and any(sign in str(error) for sign in CPU_OUT_OF_MEMORY_SIGNS))


@dataclass
class WindowMasks:
    """A chunk's decoded masks for one query: row in the chunk, owning target, and probability map of each."""
    rows: list[int]
    owners: list[int]
    probabilities: torch.Tensor | None


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on a GPU and fp32 on a CPU, where bf16 halves the memory (a Phi-3-size model: 7.7 instead of
    15 GB) but runs slower on CPUs without bf16 instructions."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InvalidInputError(f"unknown dtype {dtype!r}; choose auto, {' or '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInputError("device 'cuda' was asked for, but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(device)


class Timings(dict):
    """Seconds per step, summed over windows; waits for the GPU so a step is charged its own kernels."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    @contextmanager
    def __call__(self, step: str):
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self[step] = self.get(step, 0.0) + time.perf_counter() - start

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class Predictor:
    """Loads a model once and answers many questions about many CTs."""

    def __init__(self, model_dir: str | Path | None = None, device: str = "auto", model=None, dtype: str | torch.dtype = "auto"):
        from .. import default_model_path
        from ..model import R1Seg3D
        from ..vocabulary import load_vocabulary

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        # Resampling with torch on the GPU takes milliseconds; on a CPU, SimpleITK is the faster way.
        self.resample_on_device = self.device.type == "cuda"
        if model is None:
            self.model_dir = Path(model_dir) if model_dir else default_model_path()
            try:
                model = R1Seg3D.from_pretrained(self.model_dir, dtype=self.dtype)
            except (RuntimeError, MemoryError) as error:
                if not is_out_of_memory(error):
                    raise
                raise OutOfMemoryError(f"not enough memory to load {self.model_dir} in {str(self.dtype).removeprefix('torch.')}"
                                       + ("; bfloat16 precision (--dtype bfloat16) halves what it needs" if self.dtype == torch.float32 else "")) from error
        else:
            self.model_dir = None
        if model.language_model is None:
            raise InvalidInputError("this model has no language model (SAM mode); the predictor answers questions with R1Seg3D models")
        self.model = model.to(self.device, self.dtype).eval()
        self.preprocess = PreprocessConfig.from_dict(model.config.preprocess)
        self.vocabulary = load_vocabulary()
        self._ct_cache: CTCache | None = None

    @property
    def is_placeholder(self) -> bool:
        return bool(self.model.config.card.get("untrained"))

    # ---- public API ----------------------------------------------------------------------------------------

    def ask(self, volume: Volume | str | Path, question: str, *, conversation: Conversation | None = None,
            progress=None, cancel=None, **options) -> AnswerResult:
        try:
            return self._ask(volume, question, conversation, progress, cancel, options)
        except (RuntimeError, MemoryError) as error:
            if isinstance(error, OutOfMemoryError) or not is_out_of_memory(error):
                raise
            where = "GPU" if self.device.type == "cuda" else "CPU"
            raise OutOfMemoryError(f"out of {where} memory for this CT: free memory, or crop the CT "
                                   f"({str(error).splitlines()[0][:200]})") from error

    def _ask(self, volume, question, conversation, progress, cancel, options) -> AnswerResult:
        # None means "the default", so callers (the Slicer panel, the CLI) can pass unset fields through.
        opts = AskOptions(**{k: v for k, v in options.items() if v is not None}).validate()
        timings = Timings(self.device)
        with timings("read"):
            if not isinstance(volume, Volume):
                volume = read_volume(volume)
        question = validate_question(question)
        targets = self._targets_in(question, conversation)
        with timings("cache_lookup"):
            cache = self._cache_for(volume)    # also checks a CT it has not seen yet
        roi = self.model.window_size
        with timings("resample"):
            if cache.padded is None:
                # On the model's device in its dtype, once per CT: windows are cut there, not copied per chunk.
                image, cache.grid = model_space_tensor(volume, self.preprocess, self.device, self.resample_on_device)
                cache.padded = pad_to_roi(image.to(self.dtype), roi, value=0.0)
            padded, crop = cache.padded
            grid = cache.grid
        notes = ["the model is an untrained placeholder: its masks are not meaningful"] if self.is_placeholder else []
        history = conversation.history_text() if conversation else ""

        model_text, coarse = "", None
        if opts.global_step != "off":
            model_text, coarse = self._global_step(padded, crop, question, history, targets, opts, timings)
            if not targets:
                targets = self._targets_in_answer(model_text)
        queries = self._queries(question, history, targets)
        starts = window_starts(padded.shape, roi, opts.overlap)
        skipped = self._far_windows(starts, coarse, roi) if opts.global_step == "skip" else set()
        names = targets or [UNNAMED_TARGET]
        importance = gaussian_importance_map(roi, device=self.device)
        stitchers = [WindowStitcher(padded.shape, roi, importance, device=self.device) for _ in names]
        positives = [0] * len(names)
        active = [s for s in starts if s not in skipped]
        for stitcher in stitchers:
            stitcher.add_background([s for s in starts if s in skipped])
        self._run_windows(padded, active, queries, opts, stitchers, positives, timings, notes, progress, cancel, len(starts))

        results = []
        with timings("resample_back"):
            for name, stitcher, count in zip(names, stitchers, positives):
                on_input = input_grid_tensor(stitcher.result()[crop], grid, volume, self.resample_on_device)
                mask = (on_input >= opts.threshold).to(torch.uint8).cpu().numpy()   # a quarter of the probabilities' bytes
                probability = on_input.cpu().numpy() if opts.keep_probability else None
                voxels = int(mask.sum())
                results.append(TargetResult(name, mask, probability, voxels * volume.voxel_volume_ml, voxels, count))
        answer = compose_answer(results, named=bool(targets))
        result = AnswerResult(question, answer, results, dict(timings), notes, str(self.device), model_text, len(starts))
        if conversation is not None:
            conversation.add(question, answer, [t.name for t in results if t.present] or targets)
        return result

    # ---- targets and queries -------------------------------------------------------------------------------

    def _targets_in(self, question: str, conversation: Conversation | None) -> list[str]:
        names = [s.name for s in self.vocabulary.find_in_text(question)]
        if not names and conversation is not None:
            names = conversation.last_targets()
        return names

    def _targets_in_answer(self, text: str) -> list[str]:
        names = []
        for name in targets_named_in_answer(text):
            structure = self.vocabulary.lookup(name) if name else None
            if structure is not None and structure.name not in names:
                names.append(structure.name)
        return names

    def _queries(self, question: str, history: str, targets: list[str]) -> list[Query]:
        """One query for zero or one target (the user's own words); one explicit query per target otherwise."""
        tokenizer, n = self.model.tokenizer, self.model.num_visual_tokens

        def query(text: str, names: list[str], indices: list[int]) -> Query:
            return Query(prompt_ids(tokenizer, text, n, history), self.answer_templates(names), indices)

        if len(targets) <= 1:
            return [query(question, targets, [0])]
        return [query(PER_TARGET_QUESTION.format(target=name), [name], [i]) for i, name in enumerate(targets)]

    def answer_templates(self, names: list[str]) -> list[list[int]]:
        """The model's two answers to a question about `names`: found (one [SEG] each) or not there."""
        tokenizer, eos = self.model.tokenizer, self.model.token_ids["eos"]
        positive = positive_answer(names) if names else POSITIVE_ANSWER
        return [answer_ids(tokenizer, positive, eos), answer_ids(tokenizer, negative_answer(names), eos)]

    # ---- the global step -----------------------------------------------------------------------------------

    @torch.no_grad()
    def _global_step(self, padded, crop, question, history, targets, opts, timings):
        """One pass over the whole CT resized to one window: the text answer and a coarse mask."""
        with timings("global_step"):
            cache = self._ct_cache
            if cache.whole_ct is None:
                whole = resize_to_window(padded[crop], self.model.window_size).to(self.dtype)
                tokens = self.model.encode_images(whole[None, None])
                cache.whole_ct = (tokens, self.model.projector(tokens))
            tokens, visual = cache.whole_ct
            prompt = prompt_ids(self.model.tokenizer, question, self.model.num_visual_tokens, history)
            if targets and opts.answer_mode == "constrained":
                # The question names its targets, so the answer is one of the templates: scored, not generated.
                answers = score_candidates(self.model, visual, prompt, self.answer_templates(targets))
            else:
                answers = greedy_decode(self.model, visual, prompt, self.model.config.max_answer_tokens)
            text = self.model.tokenizer.decode(answers.token_ids[0], skip_special_tokens=False)
            text = text.replace(self.model.tokenizer.eos_token or "", "").strip()
            coarse = None
            if opts.global_step == "skip" and len(answers.seg_states[0]):
                seg = self.model.decode_masks(tokens.expand(len(answers.seg_states[0]), -1, -1),
                                              self.model.segment_projector(answers.seg_states[0]), opts.loops)
                probability = torch.sigmoid(seg.logits[:, 0].float()).amax(0)
                coarse = torch.zeros(padded.shape, device=self.device)
                coarse[crop] = torch.nn.functional.interpolate(
                    probability[None, None], size=tuple(s.stop - s.start for s in crop), mode="trilinear")[0, 0]
        return text, coarse

    def _far_windows(self, starts, coarse, roi) -> set:
        if coarse is None:
            return set()
        # One host sync for all windows, not one per window.
        maxima = torch.stack([coarse[window_region(start, roi)].amax() for start in starts]).tolist()
        return {start for start, peak in zip(starts, maxima) if peak < SKIP_THRESHOLD}

    # ---- windows -------------------------------------------------------------------------------------------

    def _run_windows(self, padded, starts, queries, opts, stitchers, positives, timings, notes, progress, cancel, total):
        batch = opts.window_batch or (16 if self.device.type == "cuda" else 4)
        done = total - len(starts)
        position = 0
        while position < len(starts):
            if cancel is not None and cancel.is_set():
                raise CancelledError("cancelled by the user")
            chunk = starts[position:position + batch]
            try:
                decoded = self._decode_windows(padded, chunk, queries, opts, timings)
            except (RuntimeError, MemoryError) as error:
                if not is_out_of_memory(error):
                    raise
                batch = self._recover_from_oom(batch, notes)
                continue
            # Stitched only once every query's masks exist, so a retried chunk is never added twice.
            for query, masks in zip(queries, decoded):
                self._stitch(chunk, query, masks, stitchers, positives, timings)
            position += len(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total, "windows")

    def _recover_from_oom(self, batch: int, notes: list[str]) -> int:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if batch > 1:
            notes.append(f"out of {'GPU' if self.device.type == 'cuda' else 'CPU'} memory: retried with {batch // 2} windows per batch")
            return batch // 2
        if self.device.type == "cuda":
            notes.append("out of GPU memory even with one window per batch: finished on the CPU")
            # Same dtype on the CPU: converting a paper-size model to fp32 could run out of host memory as well.
            self.device = torch.device("cpu")
            self.resample_on_device = False
            self.model.to(self.device)
            # What was cached on the GPU is dropped; the resampled CT (host memory) stays.
            self._ct_cache.windows.clear()
            self._ct_cache.whole_ct = None
            self._ct_cache.padded = None
            return 1
        raise OutOfMemoryError("out of memory on the CPU even with one window per batch; free memory or use a smaller model")

    def clear_cache(self) -> None:
        """Forget the last CT's resampled voxels and encoder outputs (frees their memory)."""
        self._ct_cache = None

    def _cache_for(self, volume: Volume) -> "CTCache":
        """The cache of this CT: a new CT (other voxels or geometry) replaces the previous one."""
        key = volume_fingerprint(volume)
        if self._ct_cache is None or self._ct_cache.key != key:
            validate_ct(volume)
            self._ct_cache = CTCache(key)
        return self._ct_cache

    @torch.no_grad()
    def _decode_windows(self, padded, chunk, queries, opts, timings) -> list["WindowMasks"]:
        with timings("encoder"):
            tokens, visual = self._encoded_windows(padded, chunk)
        decoded = []
        for query in queries:
            with timings("llm"):
                answers = self._answer(visual, query, opts)
            decoded.append(self._decode(tokens, answers, query, opts, timings))
        return decoded

    def _encoded_windows(self, padded, chunk):
        """Encoder tokens and visual tokens of each window: they do not depend on the question, so a follow-up
        question about the same CT reuses them (within a memory budget)."""
        cache = self._ct_cache
        missing = [start for start in chunk if start not in cache.windows]
        if missing:
            # A no-op, unless an out-of-memory fallback moved the model to the CPU during this question.
            windows = extract_windows(padded, missing, self.model.window_size).to(self.device)
            tokens = self.model.encode_images(windows)
            visual = self.model.projector(tokens)
            computed = {start: (tokens[i], visual[i]) for i, start in enumerate(missing)}
            per_window = tokens[0].numel() * tokens.element_size() + visual[0].numel() * visual.element_size()
            if (len(cache.windows) + len(missing)) * per_window <= WINDOW_CACHE_BYTES:
                cache.windows.update(computed)
        else:
            computed = {}
        pairs = [computed.get(start) or cache.windows[start] for start in chunk]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def _answer(self, visual, query: Query, opts: AskOptions) -> WindowAnswers:
        if opts.answer_mode == "constrained":
            return score_candidates(self.model, visual, query.prompt, query.candidates)
        return greedy_decode(self.model, visual, query.prompt, self.model.config.max_answer_tokens)

    def _decode(self, tokens, answers, query, opts, timings) -> "WindowMasks":
        """One mask per [SEG] of each window, owned by the target that [SEG] stands for."""
        rows, prompts, owners = [], [], []
        for row, states in enumerate(answers.seg_states):
            for k in range(min(len(states), len(query.target_indices))):
                rows.append(row)
                prompts.append(states[k])
                owners.append(query.target_indices[k])
        probabilities = None
        if rows:
            with timings("decoder"):
                prompt = self.model.segment_projector(torch.stack(prompts))
                segmentation = self.model.decode_masks(tokens[rows], prompt, opts.loops)
                probabilities = torch.sigmoid(segmentation.logits[:, 0].float())
        return WindowMasks(rows, owners, probabilities)

    @staticmethod
    def _stitch(chunk, query, masks: "WindowMasks", stitchers, positives, timings):
        """A window without a mask for a target adds background to it."""
        with timings("stitching"):
            for target in query.target_indices:
                hits = [i for i, owner in enumerate(masks.owners) if owner == target]
                hit_rows = {masks.rows[i] for i in hits}
                if hits:
                    stitchers[target].add(masks.probabilities[hits], [chunk[masks.rows[i]] for i in hits])
                    positives[target] += len(hit_rows)
                stitchers[target].add_background([start for row, start in enumerate(chunk) if row not in hit_rows])


def compose_answer(targets: list[TargetResult], named: bool) -> str:
    """The user-facing answer: what was found, with volumes, and what is not there."""
    parts = []
    for target in targets:
        label = target.name if named else "the target"
        if target.present:
            parts.append(f"Found {'the ' if named else ''}{label}: {target.volume_ml:.1f} mL ({target.voxel_count} voxels).")
        else:
            parts.append(negative_answer([label] if named else []))
    return " ".join(parts)
