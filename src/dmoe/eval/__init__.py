"""Evaluation: benchmark loaders, scoring, the resumable runner and its summary tables."""
