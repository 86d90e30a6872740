"""Per-window reasoning: the LLM's answer and its [SEG] prompts, for a batch of windows at once.

Three ways to answer:
- `score_candidates` (the fast path): the prompt is run once, then each candidate answer ("The liver is [SEG]." /
  "Sorry, there is no liver.", one pair per target) is teacher-forced on the cached prompt; the likelier candidate
  of each pair is the answer for that target and its [SEG] states come from the same forward;
- `generate` greedy: free generation with a KV cache, for answers that cannot be templated (and the `original`
  profile, which generated per window as the original code did);
- `generate` with `TopP`: the original's top-p sampling, from a fixed seed.
In every case the [SEG] states become decoder prompts through the model's one [SEG] rule (`R1Seg3D.seg_prompts`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class WindowAnswers:
    token_ids: list[list[int]]             # the answer tokens of each row (without the prompt)
    prompts: torch.Tensor | None           # (P, C) decoder prompts of all rows; None when no row has a [SEG]
    rows: list[int]                        # the row of each prompt
    masks: list[int]                       # scoring: the candidate group (target) of each prompt; generation: k-th mask
    choice: list[list[int]] | None = None  # scoring: per row, the chosen candidate of each group (0 = the first)


@dataclass(frozen=True)
class TopP:
    """The original's sampling (`do_sample=True, top_p=0.9, temperature=1.0`), from a fixed seed."""
    top_p: float = 0.9
    temperature: float = 1.0
    seed: int = 0


def _prefill(model, visual_tokens: torch.Tensor, prompt: list[int]):
    """Run `[BOS] <im_patch>*N question` for every row; the same prompt ids serve all windows."""
    rows = visual_tokens.shape[0]
    ids = torch.tensor([prompt], device=visual_tokens.device).expand(rows, -1)
    embeds = model.embed_prompt_sequence(ids, visual_tokens)
    hidden, cache = model.language_model(embeds, torch.ones_like(ids), use_cache=True)
    return hidden[:, -1], cache


def score_candidates(model, visual_tokens: torch.Tensor, prompt: list[int], groups: list[list[list[int]]]) -> WindowAnswers:
    """Per row and per group, the candidate answer with the highest total log-likelihood under teacher forcing.

    Every candidate of every group shares one prefill of the prompt, so asking about k targets costs one prompt
    pass and 2k short answers, not k prompt passes.
    """
    candidates = [candidate for group in groups for candidate in group]
    group_of = [g for g, group in enumerate(groups) for _ in group]
    rows, k = visual_tokens.shape[0], len(candidates)
    last_state, cache = _prefill(model, visual_tokens, prompt)
    cache.batch_repeat_interleave(k)
    length = max(len(c) for c in candidates)
    pad = model.token_ids["pad"]
    device = visual_tokens.device
    cand_ids = torch.full((k, length), pad, dtype=torch.long, device=device)
    cand_mask = torch.zeros((k, length), dtype=torch.long, device=device)
    for i, candidate in enumerate(candidates):
        cand_ids[i, :len(candidate)] = torch.tensor(candidate)
        cand_mask[i, :len(candidate)] = 1
    ids = cand_ids.repeat(rows, 1)
    mask = torch.cat([torch.ones((rows * k, len(prompt)), dtype=torch.long, device=device), cand_mask.repeat(rows, 1)], dim=1)
    positions = torch.arange(len(prompt), len(prompt) + length, device=device).expand(rows * k, -1)
    hidden, _ = model.language_model(model.language_model.embed_tokens(ids), mask, past_key_values=cache, position_ids=positions)
    last_repeated = last_state.repeat_interleave(k, dim=0)
    # Token t of a candidate is predicted by the state before it: the prompt's last state, then the candidate's own.
    predictors = torch.cat([last_repeated.unsqueeze(1), hidden[:, :-1]], dim=1)
    log_probs = F.log_softmax(model.language_model.logits(predictors), dim=-1)
    token_scores = log_probs.gather(-1, ids.unsqueeze(-1)).squeeze(-1) * cand_mask.repeat(rows, 1)
    totals = token_scores.sum(1).view(rows, k).tolist()     # the one host sync
    offsets = [sum(len(group) for group in groups[:g]) for g in range(len(groups))]
    choice = [[max(range(len(group)), key=lambda c: totals[r][offsets[g] + c]) for g, group in enumerate(groups)]
              for r in range(rows)]
    # The chosen answers behind the prompt's last token and state: the [SEG] rule reads them as a generated answer.
    chosen = [(r, offsets[g] + c) for r in range(rows) for g, c in enumerate(choice[r])]
    hidden = hidden.view(rows, k, length, -1)
    sequence_ids = torch.cat([torch.full((len(chosen), 1), prompt[-1], device=device), cand_ids[[c for _, c in chosen]]], 1)
    sequence_states = torch.stack([torch.cat([last_state[r:r + 1], hidden[r, c]]) for r, c in chosen])
    found = model.seg_prompts(sequence_ids, sequence_states, answer_start=1)
    token_ids = [[t for g, c in enumerate(choice[r]) for t in groups[g][c]] for r in range(rows)]
    return WindowAnswers(token_ids, found.prompts, [chosen[b][0] for b, _ in found.rows],
                         [group_of[chosen[b][1]] for b, _ in found.rows], choice)


def _next_tokens(logits: torch.Tensor, sampling: TopP | None, generator: torch.Generator | None) -> list[int]:
    if sampling is None:
        return logits.argmax(-1).tolist()
    probabilities = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    ordered, order = probabilities.sort(dim=-1, descending=True)
    # Keep the smallest set whose mass reaches top_p (the most likely token always stays), as transformers does.
    outside = ordered.cumsum(-1) - ordered > sampling.top_p
    ordered = ordered.masked_fill(outside, 0.0)
    drawn = torch.multinomial(ordered, 1, generator=generator)
    return order.gather(-1, drawn).squeeze(-1).tolist()


@torch.no_grad()
def generate(model, visual_tokens: torch.Tensor, prompt: list[int], max_new_tokens: int,
             sampling: TopP | None = None) -> WindowAnswers:
    """Greedy (or top-p sampled) generation for all rows together; rows that reached EOS stop growing."""
    eos = model.token_ids["eos"]
    rows = visual_tokens.shape[0]
    device = visual_tokens.device
    generator = None
    if sampling is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    last_state, cache = _prefill(model, visual_tokens, prompt)
    previous = last_state
    states = [last_state]                 # states[i]: after reading the i-th token of [last prompt token] + answer
    tokens: list[list[int]] = [[] for _ in range(rows)]
    finished = [False] * rows
    length = len(prompt)
    for _ in range(max_new_tokens):
        chosen = _next_tokens(model.language_model.logits(previous), sampling, generator)   # the step's host sync
        for r in range(rows):
            if not finished[r]:
                tokens[r].append(chosen[r])
                finished[r] = chosen[r] == eos
        if all(finished):
            break
        next_ids = torch.tensor([eos if finished[r] else chosen[r] for r in range(rows)], device=device)
        mask = torch.ones((rows, length + 1), dtype=torch.long, device=device)
        positions = torch.full((rows, 1), length, dtype=torch.long, device=device)
        hidden, cache = model.language_model(model.language_model.embed_tokens(next_ids[:, None]), mask,
                                             past_key_values=cache, use_cache=True, position_ids=positions)
        previous = hidden[:, -1]
        states.append(previous)
        length += 1
    # A row that stopped early is padded with eos, which no [SEG] rule reads.
    width = len(states)
    sequence = torch.full((rows, width), eos, dtype=torch.long, device=device)
    sequence[:, 0] = prompt[-1]
    for r, row_tokens in enumerate(tokens):
        row_tokens = row_tokens[:width - 1]
        sequence[r, 1:1 + len(row_tokens)] = torch.tensor(row_tokens, dtype=torch.long)
    found = model.seg_prompts(sequence, torch.stack(states, dim=1), answer_start=1)
    return WindowAnswers(tokens, found.prompts, [b for b, _ in found.rows], [k for _, k in found.rows])
