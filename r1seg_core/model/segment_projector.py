"""Segment projector (Fig. 2): the LLM's [SEG] hidden state -> the decoder's prompt embedding."""
from torch import nn


class SegmentProjector(nn.Sequential):
    def __init__(self, llm_hidden: int, prompt_dim: int, dropout: float = 0.1):
        super().__init__(nn.Linear(llm_hidden, llm_hidden), nn.ReLU(), nn.Linear(llm_hidden, prompt_dim), nn.Dropout(dropout))
