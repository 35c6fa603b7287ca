"""sstl: semi-supervised transfer learning for image classification (teacher -> pseudo-labels -> student)."""

__version__ = "0.1.0"
