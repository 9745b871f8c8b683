"""Knowledge units: the pieces of a corpus that each become one expert."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class KnowledgeUnit:
    """One passage (or document, or cluster) of the user's corpus."""

    id: str  # stable unit id (from the corpus, or derived from the source position)
    text: str  # the passage text
    title: str = ""  # optional title (Wikipedia article, file name)
    meta: dict[str, Any] = field(default_factory=dict, compare=False)  # other input fields

    @property
    def content_hash(self) -> str:
        """sha256 of title + text: the key for augmentation caches and bank skips."""
        return hashlib.sha256(f"{self.title}\n{self.text}".encode()).hexdigest()
