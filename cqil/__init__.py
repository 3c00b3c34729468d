"""cqil-pipeline: CQIL models and their deploy artifacts.

The package's parts are the repository's top folders (pyproject.toml maps them): `model/` -> `cqil.model`
(the ground), `export/` -> `cqil.export`, `engines/` -> `cqil.engines`, `pipeline/` -> `cqil.pipeline`.
Imports run one way, ground -> export -> engines -> pipeline (`python scripts/import_layers.py` checks it).
"""

from cqil.model.version import __version__

__all__ = ["__version__"]
