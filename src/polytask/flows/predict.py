"""``polytask predict``: a trained job of a run directory applied to new rows (:mod:`polytask.predict` does the
work; the CLI reaches it through the flows floor)."""

from polytask.predict import predict_file

__all__ = ["predict_file"]
