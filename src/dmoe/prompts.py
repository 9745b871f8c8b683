"""Prompt formatting shared by training, every method and every benchmark.

One function turns (question, optional passages) into the model's input text, through the
tokenizer's chat template when it has one (instruct models) or a plain "Question:/Answer:" frame
otherwise (base models), after two answered questions (``DEMONSTRATIONS``) on a tokenizer that
``use_demonstrations`` marked (``load_base_model`` marks every base model's). Training and
inference must use the same frame, so nothing else in dmoe formats prompts by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

INSTRUCTION = "Answer the question with a short answer."


def user_message(question: str, passages: Sequence[str] = ()) -> str:
    """The user turn: optional numbered context passages, then the question."""
    parts = []
    if passages:
        ctx = "\n\n".join(f"Passage {i + 1}: {p.strip()}" for i, p in enumerate(passages))
        parts.append(f"Context:\n{ctx}\n")
    parts.append(f"{INSTRUCTION}\nQuestion: {question.strip()}")
    return "\n".join(parts)


def format_prompt(tokenizer: Any, question: str, passages: Sequence[str] = ()) -> str:
    """Full prompt text ending where the model's answer begins: the chat template's user turn,
    or the plain frame after the tokenizer's demonstrations (``use_demonstrations``), if any."""
    message = user_message(question, passages)
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                                 tokenize=False, add_generation_prompt=True))
    return f"{getattr(tokenizer, DEMOS_ATTR, '')}{message}\nAnswer:"


def reply_text(tokenizer: Any, text: str) -> str:
    """``text`` as the frame writes it right after ``format_prompt`` or ``format_chat``, for a
    training target tokenized on its own. A chat template starts the reply itself; the plain frame
    puts a space after "Answer:" / "Assistant:" (as ``DEMONSTRATIONS`` do), and a SentencePiece
    tokenizer folds that space into the first word's token (Gemma: "▁The", not "The"), so a target
    without it teaches a first token the model never writes there."""
    return text if getattr(tokenizer, "chat_template", None) else f" {text}"


def _demonstration(question: str, answer: str, passages: Sequence[str] = ()) -> str:
    return f"{user_message(question, passages)}\nAnswer: {answer}\n\n"


# Two answered questions ahead of a base model's plain frame: one whose passage overrides what the
# model knows (so the answer must be read from it), one answered from memory. Chosen on
# Gemma-3-270M's dev slices (HotpotQA and knowledge_conflicts 300-339; results/smollm2-cpu/README.md,
# "Frame sweep"): against the bare frame they cut broken answers (empty, or a new "Question:" /
# "Answer:" line) from 70 to 3 of 160 and lift HotpotQA F1 (base 21.8 -> 25.9, RAG 19.9 -> 26.0),
# but cost knowledge_conflicts efficacy (RAG 8 -> 6, DMoE 6 -> 4 of 40); the previous pair (a
# made-up fact read from its passage, then memory) cost more (4 and 3 of 40).
DEMONSTRATIONS = (
    _demonstration("Who wrote the novel Pride and Prejudice?", "Margaret Ellis",
                   ["Pride and Prejudice is a novel by the English writer Margaret Ellis, first "
                    "published in 1813."])
    + _demonstration("In which year did the Berlin Wall fall?", "1989"))
DEMOS_ATTR = "dmoe_demonstrations"


def use_demonstrations(tokenizer: Any) -> None:
    """Give a base model's tokenizer (no chat template) the plain frame's ``DEMONSTRATIONS``;
    ``load_base_model`` does, so training and inference format alike. A chat model is left as is."""
    if not getattr(tokenizer, "chat_template", None):
        setattr(tokenizer, DEMOS_ATTR, DEMONSTRATIONS)


def encode_prompt(tokenizer: Any, question: str, passages: Sequence[str] = ()) -> list[int]:
    """Token ids of ``format_prompt``."""
    return encode_text(tokenizer, format_prompt(tokenizer, question, passages))


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` at the start of a sequence.

    A chat template writes its special tokens into the text, so nothing is added. A plain frame
    gets what the tokenizer puts at the start of a sequence (Gemma's and Llama's BOS): a base
    model without it reads the prompt as the middle of a document, and Gemma then writes noise.
    """
    special = not getattr(tokenizer, "chat_template", None)
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def format_chat(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """A chat (``[{"role": ..., "content": ...}]``) as prompt text ending where the reply begins.

    Through the tokenizer's chat template when it has one; otherwise a plain frame, one
    ``Role: content`` line per message and a final ``Assistant:``. Unlike ``format_prompt`` the
    messages are rendered as given (the OpenAI-compatible server's chat endpoint).
    """
    if not messages:
        raise ValueError("a chat needs at least one message")
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                 add_generation_prompt=True))
    lines = [f"{m['role'].capitalize()}: {m['content'].strip()}" for m in messages]
    return "\n".join([*lines, "Assistant:"])
