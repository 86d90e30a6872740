"""Sliding-window reasoning over a whole CT: Predictor.ask and its result objects.

Imported lazily so that `Conversation` (plain Python) does not pull in torch.
"""
from .conversation import Conversation


def __getattr__(name):
    if name == "Predictor":
        from .predictor import Predictor
        return Predictor
    if name in ("AnswerResult", "TargetResult"):
        from . import result
        return getattr(result, name)
    raise AttributeError(name)


__all__ = ["AnswerResult", "Conversation", "Predictor", "TargetResult"]
