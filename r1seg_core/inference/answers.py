"""Per-window reasoning: the LLM's answer and its [SEG] embeddings, for a batch of windows at once.

Two ways to answer, both deterministic:
- `score_candidates` (the fast path): the prompt is run once, then each candidate answer from the model's
  answer templates ("The liver is [SEG]." / "Sorry, there is no liver.") is teacher-forced on the cached prompt;
  the likelier candidate is the answer and its [SEG] states come from the same forward.
- `greedy_decode`: free greedy generation with a KV cache, for questions whose answer cannot be templated.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class WindowAnswers:
    token_ids: list[list[int]]            # the answer tokens of each row (without the prompt)
    seg_states: list[torch.Tensor]        # per row, (k, H) hidden states of its [SEG] tokens (k may be 0)
    choice: list[int] | None = None       # which candidate each row chose (scoring only)


def _prefill(model, visual_tokens: torch.Tensor, prompt: list[int]):
    """Run `[BOS] <im_patch>*N question` for every row; the same prompt ids serve all windows."""
    rows = visual_tokens.shape[0]
    ids = torch.tensor([prompt], device=visual_tokens.device).expand(rows, -1)
    embeds = model.embed_prompt_sequence(ids, visual_tokens)
    hidden, cache = model.language_model(embeds, torch.ones_like(ids), use_cache=True)
    return hidden[:, -1], cache


def _select_states(model, last_prompt_state: torch.Tensor, hidden: torch.Tensor, answer: list[int]) -> torch.Tensor:
    """[SEG] states of one answer given the states over its tokens (and the prompt's last state before them)."""
    seg_id = model.token_ids["seg"]
    first_visible = model.config.compatibility.first_generated_seg_visible
    positions = [i for i, token in enumerate(answer) if token == seg_id and (i > 0 or first_visible)]
    if model.config.compatibility.seg_state == "at":
        states = [hidden[p] for p in positions]
    else:
        # The state before token i: the prompt's last state for i == 0, else the answer's state i-1.
        states = [last_prompt_state if p == 0 else hidden[p - 1] for p in positions]
    if not states:
        return hidden.new_zeros(0, hidden.shape[-1])
    stacked = torch.stack(states)
    return stacked.mean(0, keepdim=True) if model.config.compatibility.average_seg_states else stacked


def score_candidates(model, visual_tokens: torch.Tensor, prompt: list[int], candidates: list[list[int]]) -> WindowAnswers:
    """Choose, per row, the candidate answer with the highest total log-likelihood under teacher forcing."""
    rows, k = visual_tokens.shape[0], len(candidates)
    last_state, cache = _prefill(model, visual_tokens, prompt)
    cache.batch_repeat_interleave(k)
    length = max(len(c) for c in candidates)
    pad = model.token_ids["pad"]
    cand_ids = torch.full((k, length), pad, dtype=torch.long, device=visual_tokens.device)
    cand_mask = torch.zeros((k, length), dtype=torch.long, device=visual_tokens.device)
    for i, candidate in enumerate(candidates):
        cand_ids[i, :len(candidate)] = torch.tensor(candidate)
        cand_mask[i, :len(candidate)] = 1
    ids = cand_ids.repeat(rows, 1)
    mask = torch.cat([torch.ones((rows * k, len(prompt)), dtype=torch.long, device=ids.device), cand_mask.repeat(rows, 1)], dim=1)
    positions = torch.arange(len(prompt), len(prompt) + length, device=ids.device).expand(rows * k, -1)
    hidden, _ = model.language_model(model.language_model.embed_tokens(ids), mask, past_key_values=cache, position_ids=positions)
    last_repeated = last_state.repeat_interleave(k, dim=0)
    # Token t of a candidate is predicted by the state before it: the prompt's last state, then the candidate's own.
    predictors = torch.cat([last_repeated.unsqueeze(1), hidden[:, :-1]], dim=1)
    log_probs = F.log_softmax(model.language_model.logits(predictors), dim=-1)
    token_scores = log_probs.gather(-1, ids.unsqueeze(-1)).squeeze(-1) * cand_mask.repeat(rows, 1)
    totals = token_scores.sum(1).view(rows, k)
    choice = totals.argmax(1).tolist()
    hidden = hidden.view(rows, k, length, -1)
    states = [_select_states(model, last_state[r], hidden[r, c], candidates[c]) for r, c in enumerate(choice)]
    return WindowAnswers([candidates[c] for c in choice], states, choice)


@torch.no_grad()
def greedy_decode(model, visual_tokens: torch.Tensor, prompt: list[int], max_new_tokens: int) -> WindowAnswers:
    """Greedy generation for all rows together; rows that reached EOS stop growing."""
    eos, seg = model.token_ids["eos"], model.token_ids["seg"]
    compat = model.config.compatibility
    rows = visual_tokens.shape[0]
    device = visual_tokens.device
    last_state, cache = _prefill(model, visual_tokens, prompt)
    previous = last_state
    tokens: list[list[int]] = [[] for _ in range(rows)]
    states: list[list[torch.Tensor]] = [[] for _ in range(rows)]
    finished = [False] * rows
    length = len(prompt)
    for step in range(max_new_tokens):
        chosen = model.language_model.logits(previous).argmax(-1).tolist()   # the step's one host sync
        seen_at = [r for r in range(rows) if not finished[r] and chosen[r] == seg
                   and (step > 0 or compat.first_generated_seg_visible)]
        for r in range(rows):
            if not finished[r]:
                tokens[r].append(chosen[r])
                finished[r] = chosen[r] == eos
        if compat.seg_state == "before":
            for r in seen_at:
                states[r].append(previous[r])
        if all(finished):
            break
        next_ids = torch.tensor([eos if finished[r] else chosen[r] for r in range(rows)], device=device)
        mask = torch.ones((rows, length + 1), dtype=torch.long, device=device)
        positions = torch.full((rows, 1), length, dtype=torch.long, device=device)
        hidden, cache = model.language_model(model.language_model.embed_tokens(next_ids[:, None]), mask,
                                             past_key_values=cache, use_cache=True, position_ids=positions)
        previous = hidden[:, -1]
        length += 1
        if compat.seg_state == "at":
            for r in seen_at:
                states[r].append(previous[r])
    stacked = []
    for row_states in states:
        if not row_states:
            stacked.append(last_state.new_zeros(0, last_state.shape[-1]))
            continue
        row = torch.stack(row_states)
        stacked.append(row.mean(0, keepdim=True) if compat.average_seg_states else row)
    return WindowAnswers(tokens, stacked)
