"""Training: everything that turns examples into LoRA weights.

``trunk`` (frozen trunk states, computed once per example), ``experts`` (per-unit experts: the
reference and the fast batched trainer), ``corpus`` (corpus-wide sft_lora / Poly-PRAG trainers),
``builder`` (resumable training into a bank) and ``build`` (corpus -> augmentation -> bank, what
``dmoe build`` runs). Storage (expert format, bank, poly folders) and the LoRA math live in
``dmoe.experts``; this package depends on it, never the other way round.
"""
