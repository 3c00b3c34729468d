"""The tool's version: part of every stage key and manifest, so it sits in the ground that all import."""

__version__ = "0.1.0"
