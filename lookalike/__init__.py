"""Lookalike: similar-case retrieval inside a hospital's PACS."""

__version__ = "0.1.0"
