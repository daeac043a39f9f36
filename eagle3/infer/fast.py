"""Alias: `eagle3.infer.runner.make_runner` imports the fast backend from here.

The implementation lives in eagle3/infer/fast_runner.py (and the forward in models/fast_llama.py).
"""

from eagle3.infer.fast_runner import FastRunner

__all__ = ["FastRunner"]
