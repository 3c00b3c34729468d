"""Subcommands of `cqil`, one module per stage; each has register(subparsers)."""
