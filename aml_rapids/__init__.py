"""aml-rapids: GPU-accelerated feature store and stacking classifier for single-cell AML images."""

__version__ = "0.5.0"
