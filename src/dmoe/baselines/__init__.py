"""Every method compared in the evaluation, behind one protocol (``Method.answer``)."""

from dmoe.baselines.protocol import Method, MethodConfig, Prediction
from dmoe.baselines.registry import METHOD_NAMES, Resources, build_method
from dmoe.baselines.retrieval import PassageRetriever

__all__ = ["METHOD_NAMES", "Method", "MethodConfig", "PassageRetriever", "Prediction", "Resources",
           "build_method"]
