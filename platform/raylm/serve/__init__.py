"""Serve stage: OpenAI-compatible HTTP API over a HF checkpoint, on Ray Serve."""
