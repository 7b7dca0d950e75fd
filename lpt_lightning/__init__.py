"""LPT++ for PyTorch Lightning: long-tailed prompt tuning with a mixture of experts."""

__version__ = "0.1.0"
