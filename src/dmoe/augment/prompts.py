"""The paper's two augmentation prompts (DESIGN.md step 2), verbatim, and their retry variant.

The wording is the paper's; the line breaks around the JSON example and before the passage follow
PRAG's ``augment.py``. ``PROMPT_VERSION`` is part of every augmentation cache key: change it
whenever a prompt, the retry variant or the parsing rules change, so stale cache entries are not
reused.
"""

from __future__ import annotations

PROMPT_VERSION = "paper-v1"

REWRITE_PROMPT = (
    "Rewrite the following passage. While keeping the entities, proper nouns, and key details "
    "such as names, locations, and terminology intact, create a new version of the text that "
    "expresses the same ideas in a different way. Make sure the revised passage is distinct from "
    "the original one, but preserves the core meaning and relevant information.\n"
    "Passage: {passage}"
)

QA_PROMPT = (
    "I will provide a passage of text, and you need to generate three different questions based "
    "on the content of this passage. Each question should be answerable using the information "
    "provided in the passage. Additionally, please provide an appropriate answer for each "
    "question derived from the passage. You need to generate the question and answer in the "
    "following format:\n"
    '[{{"question": "What is the capital of France?", "answer": "Paris", "full_answer": "The '
    'capital of France is Paris."}},]\n'
    "This list should have at least three elements. You only need to output this list in the "
    "above format.\n"
    "Passage: {passage}"
)

# Retry variant (second and last LLM attempt at the QA list): the same prompt plus one sentence,
# and, where the backend can, the answer pre-filled with the start of the JSON list so the model
# only has to continue it.
QA_RETRY_SUFFIX = "\nOutput only the JSON list, nothing else."
QA_PREFILL = '[{"question": "'

# The format example itself; a "generated" pair equal to it is discarded.
EXAMPLE_QUESTION = "What is the capital of France?"


def rewrite_prompt(passage: str) -> str:
    return REWRITE_PROMPT.format(passage=passage.strip())


def qa_prompt(passage: str, retry: bool = False) -> str:
    return QA_PROMPT.format(passage=passage.strip()) + (QA_RETRY_SUFFIX if retry else "")
