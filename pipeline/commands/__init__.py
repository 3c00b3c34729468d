"""Subcommands of `cqil`, one module per command (named after it), each with register(subparsers).

options.py holds the option groups several commands share and the checks every option value passes
while parsing; onnx_source.py what `cqil validate` and `cqil bench` share.
"""
