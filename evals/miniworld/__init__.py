"""Miniature world: procedural scenes and small trained models for offline ImageRAG tests."""
