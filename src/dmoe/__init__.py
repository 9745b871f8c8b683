"""dmoe: decoupled final-layer LoRA experts for parametric knowledge injection.

Pipeline, one package per stage: corpus -> augment -> experts (train, bank) -> routing -> engine
-> baselines -> eval -> server / cli.
"""

__version__ = "0.1.0"
