"""cqil-pipeline: CQIL models and their deploy artifacts.

The package's parts are the repository's top folders (pyproject.toml maps them): `model/` -> `cqil.model`
(the ground), `export/` -> `cqil.export`, `engines/` -> `cqil.engines`, `pipeline/` -> `cqil.pipeline`.
Imports run one way, ground -> export -> engines -> pipeline (`python scripts/import_layers.py` checks it).

Every entry point (the `cqil` script, `python -m cqil`, the ranks' `python -m cqil.pipeline.rank_worker`)
imports this package before PyTorch, so the OpenMP threads' wait policy is chosen here, while OpenMP
can still read it: passive, so a thread that waits for its siblings sleeps instead of spinning. With
spinning threads, one other CPU-bound process on a 2-core machine made a recovery step six times slower
(docs/recovery.md, "A busy machine"). An OMP_WAIT_POLICY already set is kept.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # GNU OpenMP (PyTorch's CPU wheels) and LLVM/Intel OpenMP
os.environ.setdefault("KMP_BLOCKTIME", "0")  # LLVM/Intel OpenMP's spin time before sleeping, in ms

from cqil.model.version import __version__  # noqa: E402 - after the thread settings

__all__ = ["__version__"]
