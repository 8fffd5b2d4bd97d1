"""Demo models for the local stack: a Triton model repository built from bundled data.

`build_repository` writes five models (``simple``, ``simple_string``, ``digits``,
``iris``, and the stateful ``accumulate``) that Triton serves with its Python backend (the first
four with onnxruntime), so every test and dev stack has real models without a download.
"""

from tensorway.demo_models._repository import build_repository

__all__ = ["build_repository"]
