"""The global step: which structures a question is about, and what the model says of them on the whole CT.

- The question names vocabulary structures ("segment the liver and the spleen"): those are the targets, and the
  model's two answers for each ("The liver is [SEG]." / "Sorry, there is no liver.") are scored on the whole CT.
- It names none, and the model lists the structures it was trained on (`known_structures`): the model chooses
  among them, scoring "The X is [SEG]." for each as one group. A choice among known organs, never free text.
- It names none and points back ("segment it again"): the previous answer's targets.
- Free generation, the model's own answer naming its targets, is what the `original` profile and the `generate`
  and `sample` answer modes do, and what models without `known_structures` fall back on.
Only vocabulary structures become targets; a word that is not one is reported as not understood.
"""
from __future__ import annotations

import torch

from ..errors import InvalidInputError
from ..prompting import answer_ids, negative_answer, positive_answer, prompt_ids
from .answers import generate, score_candidates
from .decision import is_trained
from .targets import Targets, named_in_question, read_free_answer, refers_back, requested_in_question
from .windows import window_region

# A window is skipped by the global step when the coarse whole-CT mask has no voxel above this in it.
SKIP_THRESHOLD = 0.1


def choose_targets(predictor, view, question, conversation, history, answer_mode, opts, notes, timings):
    """The question's targets, the whole-CT answer's text, and (global_step "skip") its coarse mask."""
    named = named_in_question(predictor.vocabulary, question)
    known = predictor.model.config.known_structures
    if known and not predictor.text_prompted:
        # A model that knows what it was trained on reads names outside a request as description, and chooses.
        described = [name for name in named if name not in requested_in_question(predictor.vocabulary, question)]
        if described:
            named = [name for name in named if name not in described]
            notes.append(f"the question mentions {', '.join(described)} while describing its target, not as a target")
    earlier = conversation.last_targets() if conversation is not None else []
    if predictor.text_prompted:
        names = named or earlier
        if not names:
            raise InvalidInputError("this text-prompted model (SAM mode) segments a named structure and does not "
                                    "reason: name one, e.g. 'segment the liver'")
        notes.append("text-prompted model (SAM mode, the paper's 'without reasoning' baseline): it segments every "
                     "named target and does not reason about the question")
        return Targets(names), "", None
    step = opts.global_step != "off"
    if answer_mode != "constrained":
        return _from_generation(predictor, view, question, history, named, earlier, opts, notes, timings)
    if named:
        trained = [name for name in named if is_trained(name, known)]
        if not step or not trained:
            return Targets(named), "", None
        groups = [[positive_answer([name]), negative_answer([name])] for name in trained]
        choice, model_text, coarse = _score_on_whole_ct(predictor, view, question, history, groups, opts, timings)
        return Targets(named, {name: c == 0 for name, c in zip(trained, choice)}), model_text, coarse
    if earlier and (refers_back(question) or not step):
        notes.append("the question names no structure: its targets are the previous answer's")
        return Targets(earlier), "", None
    if step and known:
        choice, model_text, coarse = _score_on_whole_ct(
            predictor, view, question, history, [[positive_answer([name]) for name in known]], opts, timings)
        chosen = known[choice[0]]
        notes.append(f"the question names no structure: the model chose the {chosen} among the {len(known)} "
                     "structures it was trained on")
        return Targets([chosen]), model_text, coarse
    if step:
        return _from_generation(predictor, view, question, history, named, earlier, opts, notes, timings)
    return Targets([]), "", None


def _from_generation(predictor, view, question, history, named, earlier, opts, notes, timings):
    """The model's own answer names the targets; the question's structure names, then the previous answer's
    targets, only when it names none."""
    model_text, coarse, spoken = "", None, None
    if opts.global_step != "off":
        model_text, coarse = _generate_on_whole_ct(predictor, view, question, history, opts, timings)
        spoken = read_free_answer(predictor.vocabulary, model_text)
        if spoken.names:
            return spoken, model_text, coarse
    names = named or earlier
    if not names:
        return Targets([], not_understood=spoken.not_understood if spoken else []), model_text, coarse
    notes.append(f"the model's answer named no target{'' if spoken is not None else ' (no whole-CT answer)'}: the "
                 f"targets are {'the structure names in the question' if named else 'the previous answer' + chr(39) + 's'}")
    if spoken is None:
        return Targets(names), model_text, coarse
    # An unnamed [SEG] ("It is [SEG].") still says yes, an answer without one says no.
    seg_names = [names[k] if k < len(names) else None for k in range(len(spoken.seg_names))]
    return Targets(names, {name: bool(spoken.seg_names) for name in names}, seg_names), model_text, coarse


@torch.no_grad()
def _score_on_whole_ct(predictor, view, question, history, groups, opts, timings):
    """The likelier answer of each group on the whole CT: its index per group, the chosen answers as one text."""
    model = predictor.model
    with timings("global_step"):
        tokens, visual = predictor._whole_ct(view)
        prompt = prompt_ids(model.tokenizer, question, model.num_visual_tokens, history)
        eos = model.token_ids["eos"]
        ids = [[answer_ids(model.tokenizer, text, eos) for text in group] for group in groups]
        answers = score_candidates(model, visual, prompt, ids)
        choice = answers.choice[0]
        text = " ".join(group[c] for group, c in zip(groups, choice))
        return choice, text, _coarse(predictor, view, tokens, answers, opts)


@torch.no_grad()
def _generate_on_whole_ct(predictor, view, question, history, opts, timings):
    """The model's own greedy answer to the question as written."""
    model = predictor.model
    with timings("global_step"):
        tokens, visual = predictor._whole_ct(view)
        prompt = prompt_ids(model.tokenizer, question, model.num_visual_tokens, history)
        answers = generate(model, visual, prompt, predictor.max_new_tokens)
        text = model.tokenizer.decode(answers.token_ids[0], skip_special_tokens=False)
        text = text.replace(model.tokenizer.eos_token or "", "").strip()
        return text, _coarse(predictor, view, tokens, answers, opts)


def _coarse(predictor, view, tokens, answers, opts):
    """For global_step "skip": the whole CT's mask on the padded grid, from the whole-CT answer's [SEG] prompts."""
    if opts.global_step != "skip" or not view.sliding or answers.prompts is None:
        return None
    seg = predictor.model.decode_masks(tokens.expand(len(answers.rows), -1, -1), answers.prompts, opts.loops)
    probability = torch.sigmoid(seg.logits[:, 0].float()).amax(0)
    coarse = torch.zeros(view.padded.shape, device=predictor.device)
    coarse[view.crop] = torch.nn.functional.interpolate(
        probability[None, None], size=tuple(s.stop - s.start for s in view.crop), mode="trilinear")[0, 0]
    return coarse


def far_windows(starts, coarse, roi) -> set:
    """The windows the coarse mask does not reach (global_step "skip")."""
    if coarse is None:
        return set()
    # One host sync for all windows, not one per window.
    maxima = torch.stack([coarse[window_region(start, roi)].amax() for start in starts]).tolist()
    return {start for start, peak in zip(starts, maxima) if peak < SKIP_THRESHOLD}
