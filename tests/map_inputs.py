"""Kept for tests/test_cuda_emulated.py until it imports tests/support.py, where this now lives."""

from support import peaked_logits

__all__ = ["peaked_logits"]
