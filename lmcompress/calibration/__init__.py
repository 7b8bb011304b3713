"""Calibration: text → token windows (``data``), the block-by-block walker (``engine``) and the statistics it
collects from each layer's inputs (``stats``)."""

from lmcompress.calibration.data import draw

__all__ = ["draw"]
