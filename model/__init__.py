"""The model ground: plans, the CQIL model, its group step and KV-cache helpers (DESIGN.md section 3).

Nothing here imports `export/`, `engines/` or the CLI; every other part of the project may import it.
"""
