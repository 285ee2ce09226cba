"""The interactive DreamFusion app: a Gradio page plus a live viser viewer (``python -m app``)."""

from .interface import AppHandle, create_app  # noqa: F401
