"""cqil-pipeline: CQIL models and their deploy artifacts."""

__version__ = "0.1.0"
