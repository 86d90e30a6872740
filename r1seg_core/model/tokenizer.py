"""The project's own small tokenizer, for models built from a config without a pretrained LLM folder.

A byte-level BPE learned from the project's question/answer templates and target vocabulary, so any text
encodes (no unknown tokens) and the tiny models ship with a real tokenizer rather than a mock.
"""
from __future__ import annotations

import copy
import functools

from .. import prompting

BPE_VOCAB_SIZE = 1024
# Per family: (bos, eos, unk). Qwen-style tokenizers add no BOS, which the visual-token placement must survive.
FAMILY_TOKENS = {
    "phi3": ("<s>", "<|endoftext|>", "<unk>"),
    "llama": ("<|begin_of_text|>", "<|end_of_text|>", None),
    "mistral": ("<s>", "</s>", "<unk>"),
    "qwen2": (None, "<|endoftext|>", None),
}


def training_corpus() -> list[str]:
    from ..vocabulary import load_vocabulary

    texts = [t for group in (prompting.EXPLICIT_QUESTIONS, prompting.IMPLICIT_QUESTIONS, prompting.EXISTENCE_QUESTIONS,
                             prompting.EXISTENCE_YES, prompting.EXISTENCE_NO) for t in group]
    texts += [prompting.POSITIVE_ANSWER, prompting.NAMED_POSITIVE_ANSWER, prompting.NEGATIVE_ANSWER]
    for structure in load_vocabulary().structures:
        texts.append(structure.name)
        texts.extend(structure.all_descriptions)
    return texts


def build_project_tokenizer(family: str):
    """A fresh copy each call: callers add tokens to it."""
    return copy.deepcopy(_trained_tokenizer(family))


@functools.lru_cache(maxsize=None)
def _trained_tokenizer(family: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    if family == "bert":
        specials = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"}
    else:
        bos, eos, unk = FAMILY_TOKENS[family]
        specials = {"eos_token": eos, "pad_token": eos}
        if bos:
            specials["bos_token"] = bos
        if unk:
            specials["unk_token"] = unk
    ordered = list(dict.fromkeys(specials.values()))
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, special_tokens=ordered,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(training_corpus(), trainer=trainer)
    if family == "bert":
        cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    elif "bos_token" in specials:
        bos = specials["bos_token"]
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, padding_side="right", **specials)
