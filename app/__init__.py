"""The interactive DreamFusion app: a Gradio page plus a live viser viewer (``python -m app``).

The package imports nothing heavy by itself: the worker processes (:mod:`app.worker`) import it
without loading Gradio."""


def __getattr__(name: str) -> object:
    if name in ("AppHandle", "create_app"):
        from . import interface

        return getattr(interface, name)
    raise AttributeError(f"module 'app' has no attribute {name!r}")


__all__ = ["AppHandle", "create_app"]
