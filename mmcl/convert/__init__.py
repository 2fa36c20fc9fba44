"""Weights in and out: open_clip / OpenAI CLIP (import, export) and big_vision SigLIP (import)."""
