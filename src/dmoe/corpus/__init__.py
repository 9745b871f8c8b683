"""Corpus ingestion: files -> documents -> knowledge units (passage, document or cluster)."""

from dmoe.corpus.readers import CorpusReport, Skip, detect_format, read_corpus, read_documents
from dmoe.corpus.split import split_passages, split_sentences, to_units
from dmoe.corpus.units import KnowledgeUnit

__all__ = ["CorpusReport", "KnowledgeUnit", "Skip", "detect_format", "read_corpus",
           "read_documents", "split_passages", "split_sentences", "to_units"]
