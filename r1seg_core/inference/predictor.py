"""Predictor.ask: a CT and a question in, an answer and one mask per target on the CT's own grid out.

The path of one question:
1. a follow-up about the conversation's last targets ("how big is it?") is answered from their stored masks
   (`followup.py`), without running the model;
2. the global step (`global_step.py`): the question's targets, and what the model says of them on the whole CT;
3. the windows (or one window of the whole CT, `sliding_window=False`), for the targets the model was trained on:
   each target's two answers ("The pancreas is [SEG]." / "Sorry, there is no pancreas.") scored on one shared
   prefill, or the answer generated; each [SEG] becomes a decoder prompt through the model's [SEG] rule
   (`R1Seg3D.seg_prompts`), and only windows with a mask add to the fused mask (the `original` profile: the
   published code's constant mean of logits, with a -1000 veto from windows without one);
4. one decision per target (`decision.py`) from that evidence, and the text written from the decisions
   (`answer_text.py`).
A text-prompted (SAM-mode) model skips the reasoning: it segments every named target, the paper's "without
reasoning" baseline. Windows go through every stage in batches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import CancelledError, CheckpointError, InvalidInputError, OutOfMemoryError
from ..model.r1seg3d import NO_SEG_LOGIT
from ..preprocess import (PreprocessConfig, input_grid_tensor, model_space_tensor, resize_from_window,
                          resize_to_window)
from ..prompting import answer_ids, negative_answer, positive_answer, prompt_ids, targets_named_in_answer, validate_question
from ..volume import Volume, read_volume, validate_ct
from .answer_text import compose_answer
from .answers import TopP, WindowAnswers, generate, score_candidates
from .conversation import Conversation
from .decision import Evidence, decide, is_trained
from .devices import Timings, is_out_of_memory, resolve_device, resolve_dtype
from .fingerprint import fingerprint_text, volume_fingerprint
from .followup import answer_follow_up, follow_up_targets
from .global_step import choose_targets, far_windows
from .profiles import PROJECT, foreground_box, original_intensities, resolve_profile
from .result import AnswerResult, TargetResult
from .targets import Targets, canonical
from .windows import WindowStitcher, extract_windows, gaussian_importance_map, pad_to_roi, window_starts

ANSWER_MODES = ("constrained", "generate", "sample")
GLOBAL_STEP_MODES = ("off", "answer", "skip")
# Encoder outputs kept for follow-up questions about the same CT (126 Phi-3-size windows take about 0.6 GB).
WINDOW_CACHE_BYTES = 2 * 1024 ** 3
WHOLE_CT = (0, 0, 0)

@dataclass
class AskOptions:
    overlap: float | None = None          # None: the profile's (project 0.25, original 0.5)
    loops: int | None = None              # None: the checkpoint's refine_loops
    window_batch: int | None = None       # None: 16 on a GPU, 4 on the CPU
    answer_mode: str | None = None        # None: the profile's (project: constrained, original: generate)
    global_step: str = "answer"
    sliding_window: bool = True           # False: the whole CT resized to one window (the paper's Fig. 4)
    seed: int = 0                         # answer_mode "sample": the seed of the top-p sampling
    keep_probability: bool = False
    threshold: float = 0.5

    def validate(self) -> "AskOptions":
        if self.overlap is not None and not 0.0 <= self.overlap < 1.0:
            raise InvalidInputError(f"window overlap must be in [0, 1); got {self.overlap}")
        if self.loops is not None and not 0 <= self.loops <= 3:
            raise InvalidInputError(f"refinement loops must be between 0 and 3; got {self.loops}")
        if self.window_batch is not None and self.window_batch < 1:
            raise InvalidInputError(f"window batch must be at least 1; got {self.window_batch}")
        if self.answer_mode is not None and self.answer_mode not in ANSWER_MODES:
            raise InvalidInputError(f"answer mode must be one of {ANSWER_MODES}; got {self.answer_mode!r}")
        if self.global_step not in GLOBAL_STEP_MODES:
            raise InvalidInputError(f"global step must be one of {GLOBAL_STEP_MODES}; got {self.global_step!r}")
        if not isinstance(self.sliding_window, bool):
            raise InvalidInputError(f"sliding_window must be True or False; got {self.sliding_window!r}")
        return self


@dataclass
class View:
    """One way of showing a CT to the model: the volume windows are cut from, and the way back to the CT's grid."""
    padded: torch.Tensor                             # (D, H, W) on the model's device, in its dtype
    crop: tuple                                      # the part of `padded` that holds the CT
    back: Callable[[torch.Tensor], torch.Tensor]     # fused values on padded[crop] -> values on the input grid
    sliding: bool
    windows: dict = field(default_factory=dict)      # window start -> (encoder tokens, visual tokens)
    whole_ct: tuple | None = None                    # the global step's (encoder tokens, visual tokens)


@dataclass
class CTCache:
    """What the predictor keeps about the CT it last answered a question on: one View per (profile, sliding)."""
    key: bytes
    views: dict = field(default_factory=dict)


class Predictor:
    """Loads a model once and answers many questions about many CTs.

    `profile`: "project", "original" (the published code's preprocessing, fusion and answers) or "auto", which is
    "original" for folders converted from the published weights. Text-prompted (SAM-mode) models are accepted.
    """

    def __init__(self, model_dir: str | Path | None = None, device: str = "auto", model=None,
                 dtype: str | torch.dtype = "auto", profile: str = "auto"):
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
        self.profile = resolve_profile(profile, model.config.card)
        self.model = model.to(self.device, self.dtype).eval()
        self.preprocess = PreprocessConfig.from_dict(model.config.preprocess)
        self.vocabulary = load_vocabulary()
        unknown = [name for name in model.config.known_structures or [] if canonical(self.vocabulary, name) != name]
        if unknown:
            raise CheckpointError(f"the model's known_structures {unknown} are not canonical vocabulary names; "
                                  "write them as r1seg_core/vocabulary/structures.json names them")
        self._ct_cache: CTCache | None = None

    @property
    def is_placeholder(self) -> bool:
        return bool(self.model.config.card.get("untrained"))

    @property
    def max_new_tokens(self) -> int:
        return self.profile.max_new_tokens or self.model.config.max_answer_tokens

    @property
    def text_prompted(self) -> bool:
        """A SAM-mode model: prompted by target names through its text encoder, no LLM, no reasoning."""
        return self.model.language_model is None

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
        answer_mode = opts.answer_mode or self.profile.answer_mode
        timings = Timings(self.device)
        with timings("read"):
            if not isinstance(volume, Volume):
                volume = read_volume(volume)
        question = validate_question(question)
        with timings("cache_lookup"):
            cache = self._cache_for(volume)    # also checks a CT it has not seen yet
        notes = ["the model is an untrained placeholder: its masks are not meaningful"] if self.is_placeholder else []
        if self.profile.name != PROJECT:
            notes.append(f"inference profile '{self.profile.name}': the published code's preprocessing, window fusion "
                         "and per-window generated answers")
        if conversation is not None and conversation.bind(fingerprint_text(cache.key)):
            notes.append("this conversation was about another CT: its earlier segments are not reused")
        stored = follow_up_targets(question, conversation, self.vocabulary)
        if stored is not None:
            text, results = answer_follow_up(question, stored, volume)
            result = AnswerResult(question, text, results, dict(timings), notes, str(self.device), profile=self.profile.name,
                                  answered_from="conversation", shape=volume.shape)
            # Not the model's words: nothing for it to read back in the history.
            conversation.add(question, "", [t.name for t in results], results, text)
            return result

        with timings("resample"):
            view = self._view(volume, cache, opts.sliding_window)
        history = conversation.history_text() if conversation else ""
        targets, model_text, coarse = choose_targets(self, view, question, conversation, history, answer_mode, opts,
                                                     notes, timings)
        if self.model.config.compatibility.average_seg_states and len(targets.names) > 1:
            # The original's rule: several [SEG] states are averaged into one prompt, so one mask answers them all.
            joined = " and ".join(targets.names)
            notes.append(f"this model averages several [SEG] into one mask (the original's rule): one segment, {joined!r}")
            said = {joined: any(targets.said.values())} if targets.said else {}
            targets = Targets([joined], said, [joined] if targets.seg_names else [])
        known = self.model.config.known_structures
        trained = [name for name in targets.names if is_trained(name, known)]
        starts = self._starts(view, opts) if trained else []
        found = self._segment(view, starts, trained, question, history, answer_mode, opts, coarse, notes, timings,
                              progress, cancel)
        results = []
        for name in targets.names:
            mask, probability, positive = found.get(name, (np.zeros(volume.shape, np.uint8), None, 0))
            evidence = Evidence(name, int(mask.sum()) * volume.voxel_volume_ml, targets.said.get(name), positive,
                                len(starts))
            decision = decide(evidence, known, self.model.config.presence_min_ml)
            results.append(TargetResult.from_decision(decision, mask, probability, volume.voxel_volume_ml))
        free_text = model_text if answer_mode != "constrained" else ""
        answer = compose_answer(results, targets, len(starts), question, free_text)
        result = AnswerResult(question, answer, results, dict(timings), notes, str(self.device), model_text, len(starts),
                              self.profile.name, list(targets.not_understood), shape=volume.shape)
        if conversation is not None:
            # The model reads its own words back in the history, not the volumes written for the user.
            conversation.add(question, model_text or answer, targets.names, results, answer)
        return result

    def answer_templates(self, names: list[str]) -> list[list[list[int]]]:
        """Per target, the model's two answers: found (one [SEG]) or not there."""
        tokenizer, eos = self.model.tokenizer, self.model.token_ids["eos"]
        return [[answer_ids(tokenizer, positive_answer([name]), eos), answer_ids(tokenizer, negative_answer([name]), eos)]
                for name in names]

    # ---- views of the CT -----------------------------------------------------------------------------------

    def _view(self, volume: Volume, cache: CTCache, sliding: bool) -> View:
        key = (self.profile.name, sliding)
        if key in cache.views:
            return cache.views[key]
        roi = self.model.window_size
        if self.profile.grid == "canonical":
            # On the model's device in its dtype, once per CT: windows are cut there, not copied per chunk.
            image, grid = model_space_tensor(volume, self.preprocess, self.device, self.resample_on_device)

            def to_input(values):
                return input_grid_tensor(values, grid, volume, self.resample_on_device)
        else:
            scaled = original_intensities(volume.array)
            box = foreground_box(scaled)
            image = torch.from_numpy(np.ascontiguousarray(scaled[box])).to(self.device)

            def to_input(values):
                # Outside the foreground box no window looked: the original's "no [SEG]" logits.
                full = values.new_full(volume.shape, NO_SEG_LOGIT)
                full[box] = values
                return full
        if sliding:
            padded, crop = pad_to_roi(image.to(self.dtype), roi, value=0.0)
            back = to_input
        else:
            shape = tuple(image.shape)
            padded = resize_to_window(image, roi).to(self.dtype)
            crop = tuple(slice(0, n) for n in roi)

            def back(values):
                return to_input(resize_from_window(values, shape))
        cache.views[key] = View(padded, crop, back, sliding)
        return cache.views[key]

    # ---- the global step -----------------------------------------------------------------------------------

    def _whole_ct(self, view: View):
        """Encoder and visual tokens of the whole CT in one window (without sliding, that window itself)."""
        if not view.sliding:
            return self._encoded_windows(view, [WHOLE_CT])
        if view.whole_ct is None:
            whole = resize_to_window(view.padded[view.crop], self.model.window_size).to(self.dtype)
            tokens = self.model.encode_images(whole[None, None])
            view.whole_ct = (tokens, self.model.projector(tokens))
        return view.whole_ct

    # ---- windows -------------------------------------------------------------------------------------------

    def _starts(self, view: View, opts: AskOptions) -> list:
        overlap = self.profile.overlap if opts.overlap is None else opts.overlap
        return window_starts(view.padded.shape, self.model.window_size, overlap) if view.sliding else [WHOLE_CT]

    def _segment(self, view, starts, names, question, history, answer_mode, opts, coarse, notes, timings, progress,
                 cancel) -> dict:
        """Per target: its fused mask on the input grid, its probabilities (when kept), and its windows with a mask."""
        if not names:
            return {}
        roi = self.model.window_size
        skipped = far_windows(starts, coarse, roi) if opts.global_step == "skip" else set()
        constant = self.profile.fusion == "constant"
        importance = torch.ones(roi, device=self.device) if constant else gaussian_importance_map(roi, device=self.device)
        background = NO_SEG_LOGIT if constant else 0.0
        stitchers = [WindowStitcher(view.padded.shape, roi, importance, device=self.device, background=background)
                     for _ in names]
        positives = [0] * len(names)
        active = [s for s in starts if s not in skipped]
        if constant:
            for stitcher in stitchers:
                stitcher.add_background([s for s in starts if s in skipped])
        ask = self._window_asker(question, history, names, answer_mode, opts)
        self._run_windows(view, active, ask, opts, stitchers, positives, timings, notes, progress, cancel, len(starts))
        found = {}
        with timings("resample_back"):
            for name, stitcher, count in zip(names, stitchers, positives):
                on_input = view.back(stitcher.result()[view.crop])
                probability = torch.sigmoid(on_input) if constant else on_input
                mask = (probability >= opts.threshold).to(torch.uint8).cpu().numpy()   # a quarter of the probabilities' bytes
                found[name] = (mask, probability.cpu().numpy() if opts.keep_probability else None, count)
        return found

    def _window_asker(self, question: str, history: str, names: list[str], answer_mode: str, opts: AskOptions):
        """A function from a chunk's visual tokens to its answers: (prompts, row of each, target of each)."""
        if self.text_prompted:
            prompts = self.model.text_prompts(names, self.device).to(self.dtype)

            def ask(visual):
                rows = [row for row in range(visual.shape[0]) for _ in names]
                return prompts.repeat(visual.shape[0], 1), rows, list(range(len(names))) * visual.shape[0]
            return ask
        prompt = prompt_ids(self.model.tokenizer, question, self.model.num_visual_tokens, history)
        if answer_mode == "constrained":
            groups = self.answer_templates(names)

            def ask(visual):
                answers = score_candidates(self.model, visual, prompt, groups)
                return answers.prompts, answers.rows, answers.masks
            return ask
        sampling = TopP(seed=opts.seed) if answer_mode == "sample" else None

        def ask(visual):
            answers = generate(self.model, visual, prompt, self.max_new_tokens, sampling)
            return answers.prompts, answers.rows, self._owners(answers, names)
        return ask

    def _owners(self, answers: WindowAnswers, names: list[str]) -> list[int]:
        """For generated answers: the target of each mask, by the name before its [SEG], else by its order."""
        said_by_row: dict[int, list[str | None]] = {}     # a row's answer is read once, not once per mask
        owners = []
        for row, k in zip(answers.rows, answers.masks):
            if row not in said_by_row:
                text = self.model.tokenizer.decode(answers.token_ids[row], skip_special_tokens=False)
                said_by_row[row] = [canonical(self.vocabulary, name) for name in targets_named_in_answer(text)]
            said = said_by_row[row]
            name = said[k] if k < len(said) and said[k] in names else None
            owners.append(names.index(name) if name is not None else min(k, len(names) - 1))
        return owners

    def _run_windows(self, view, starts, ask, opts, stitchers, positives, timings, notes, progress, cancel, total):
        home = self.device
        try:
            self._run_windows_on(view, starts, ask, opts, stitchers, positives, timings, notes, progress, cancel, total)
        finally:
            if self.device != home:
                self._return_to(home)

    def _run_windows_on(self, view, starts, ask, opts, stitchers, positives, timings, notes, progress, cancel, total):
        batch = opts.window_batch or (16 if self.device.type == "cuda" else 4)
        done = total - len(starts)
        position = 0
        while position < len(starts):
            if cancel is not None and cancel.is_set():
                raise CancelledError("cancelled by the user")
            chunk = starts[position:position + batch]
            try:
                masks = self._decode_windows(view, chunk, ask, opts, timings)
            except (RuntimeError, MemoryError) as error:
                if not is_out_of_memory(error):
                    raise
                batch = self._recover_from_oom(batch, notes)
                continue
            # Stitched only once every mask of the chunk exists, so a retried chunk is never added twice.
            self._stitch(chunk, masks, stitchers, positives, timings)
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
            notes.append("out of GPU memory even with one window per batch: this question's windows ran on the CPU")
            # Same dtype on the CPU: converting a paper-size model to fp32 could run out of host memory as well.
            self.device = torch.device("cpu")
            self.resample_on_device = False
            self.model.to(self.device)
            # What was cached on the GPU is dropped; this question's view keeps the voxels its windows are cut from.
            for view in self._ct_cache.views.values():
                view.windows.clear()
                view.whole_ct = None
            self._ct_cache.views.clear()
            return 1
        raise OutOfMemoryError("out of memory on the CPU even with one window per batch; free memory or use a smaller model")

    def _return_to(self, device: torch.device) -> None:
        """After an out-of-memory fallback to the CPU: back to the GPU, so that one large CT slows only its own
        question, not every later one. The CPU copies of this CT's windows are dropped with the cache."""
        self._ct_cache = None
        try:
            self.model.to(device)
        except (RuntimeError, MemoryError) as error:
            if not is_out_of_memory(error):
                raise
            self.model.to(self.device)    # the GPU is still full: stay on the CPU rather than half-moved
            return
        self.device = device
        self.resample_on_device = device.type == "cuda"

    def clear_cache(self) -> None:
        """Forget the last CT's resampled voxels and encoder outputs (frees their memory)."""
        self._ct_cache = None

    def _cache_for(self, volume: Volume) -> CTCache:
        """The cache of this CT: a new CT (other voxels or geometry) replaces the previous one."""
        key = volume_fingerprint(volume)
        if self._ct_cache is None or self._ct_cache.key != key:
            validate_ct(volume)
            self._ct_cache = CTCache(key)
        return self._ct_cache

    @torch.no_grad()
    def _decode_windows(self, view, chunk, ask, opts, timings):
        """The chunk's masks: (row in the chunk, owning target) of each, and their fused values (probabilities for
        Gaussian fusion, logits for the original's constant fusion)."""
        with timings("encoder"):
            tokens, visual = self._encoded_windows(view, chunk)
        with timings("llm"):
            prompts, rows, owners = ask(visual)
        values = None
        if rows:
            with timings("decoder"):
                logits = self.model.decode_masks(tokens[rows], prompts, opts.loops).logits[:, 0].float()
                values = logits if self.profile.fusion == "constant" else torch.sigmoid(logits)
        return rows, owners, values

    def _encoded_windows(self, view: View, chunk):
        """Encoder tokens and visual tokens of each window: they do not depend on the question, so a follow-up
        question about the same CT reuses them (within a memory budget)."""
        missing = [start for start in chunk if start not in view.windows]
        if missing:
            # A no-op, unless an out-of-memory fallback moved the model to the CPU during this question.
            windows = extract_windows(view.padded, missing, self.model.window_size).to(self.device)
            tokens = self.model.encode_images(windows)
            # A text-prompted model has no LLM: an empty stand-in keeps one cache layout for both kinds.
            visual = self.model.projector(tokens) if not self.text_prompted else tokens[:, :0]
            computed = {start: (tokens[i], visual[i]) for i, start in enumerate(missing)}
            per_window = tokens[0].numel() * tokens.element_size() + visual[0].numel() * visual.element_size()
            if (len(view.windows) + len(missing)) * per_window <= WINDOW_CACHE_BYTES:
                view.windows.update(computed)
        else:
            computed = {}
        pairs = [computed.get(start) or view.windows[start] for start in chunk]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def _stitch(self, chunk, masks, stitchers, positives, timings):
        """Only windows with a mask for a target add to it: a window that answered "no" adds nothing, so it cannot
        erase what its neighbours found. The original's constant fusion keeps its -1000 veto from such windows."""
        rows, owners, values = masks
        veto = self.profile.fusion == "constant"
        with timings("stitching"):
            for target, stitcher in enumerate(stitchers):
                hits = [i for i, owner in enumerate(owners) if owner == target]
                hit_rows = {rows[i] for i in hits}
                if hits:
                    stitcher.add(values[hits], [chunk[rows[i]] for i in hits])
                    positives[target] += len(hit_rows)
                if veto:
                    stitcher.add_background([start for row, start in enumerate(chunk) if row not in hit_rows])
