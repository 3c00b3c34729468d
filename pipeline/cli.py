"""The `cqil` command line: the parser, and exit codes that a CI job can trust.

Each subcommand lives in the module of pipeline/commands/ named after it and registers itself with
`register(subparsers)`; heavy imports stay inside the command functions so that `cqil --help` is
quick and every module imports on a CPU-only machine.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import NoReturn

from cqil.model.errors import CqilError, ExitCode
from cqil.model.settings import Check

# The exit codes, documented in `cqil --help` and the README.
OK, CHECK_FAILED, BAD_INPUT, INTERNAL_ERROR, INTERRUPTED = (ExitCode.OK, ExitCode.CHECK_FAILED, ExitCode.BAD_INPUT,
                                                           ExitCode.INTERNAL_ERROR, ExitCode.INTERRUPTED)

EXIT_CODES = """\
exit codes:
  0  success
  1  a check ran and failed (cqil validate, cqil gate, cqil verify, a build whose validation failed)
  2  bad input or usage: a missing or malformed option or file, an output location that cannot be
     written (checked before any long work starts); one line on stderr names it
  3  an internal error (a bug): one line on stderr says where the traceback was saved; --debug prints it
  4  a multi-process run (--ranks) broke: a rank died or failed to load, a collective timed out
  130  interrupted (Ctrl-C, SIGINT); 143  terminated (SIGTERM): what was being written is cleaned up
--debug never changes the exit code. --out never deletes what cqil did not write: an existing output
folder is replaced only if cqil wrote it (it holds a .cqil-output file); any other non-empty folder is
refused."""

COMMAND_MODULES = (
    "analyze", "plan", "eval", "generate", "finetune", "merge", "export", "engine", "triton", "validate",
    "bench", "gate", "build", "verify", "compare",
)
from cqil.model import signals
from cqil.model.version import __version__


class OptionError(CqilError):
    """An option value that failed its check while parsing; carries the command it belongs to."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors, and option checks (commands/options.py) that name option and value."""

    def error(self, message: str) -> NoReturn:
        self.exit(BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def _get_value(self, action: argparse.Action, arg_string: str):
        if not isinstance(action.type, Check):
            return super()._get_value(action, arg_string)
        option = action.option_strings[-1] if action.option_strings else action.metavar or action.dest
        try:
            return action.type(arg_string, option)
        except CqilError as exc:  # the check's message names the option already
            raise OptionError(self.prog, str(exc)) from exc
        except ValueError as exc:
            shown = arg_string if arg_string and not any(c.isspace() for c in arg_string) else repr(arg_string)
            raise OptionError(self.prog, f"{option} {shown} {exc}") from exc


def build_parser() -> argparse.ArgumentParser:
    import importlib


    parser = Parser(prog="cqil", description="CQIL: concurrent quasi-independent layers for LLaMA-family LLMs",
                    epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"cqil-pipeline {__version__}")
    parser.add_argument("--debug", action="store_true", help="print tracebacks (the exit code stays the same)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"cqil.pipeline.commands.{name}").register(sub)
    return parser


def quiet_libraries() -> None:
    import logging
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notes
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # "Writing model shards" on every save
    except ImportError:
        pass


def _save_traceback() -> str:
    """Write the current traceback to a file; its path (or why it could not be written)."""
    import os
    import tempfile
    import time

    text = traceback.format_exc()
    try:
        fd, path = tempfile.mkstemp(prefix=f"cqil-traceback-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".txt")
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        return f"traceback in {path}"
    except OSError:
        return "the traceback could not be saved"


def _os_error_line(exc: OSError) -> str:
    names = [name for name in (exc.filename, exc.filename2) if name]
    where = " -> ".join(f"'{name}'" for name in names)
    return f"{exc.strerror or exc}{': ' + where if where else ''}"


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (argparse usage errors exit 2 through SystemExit)."""
    signals.install()
    try:
        args = build_parser().parse_args(argv)
    except OptionError as exc:
        if "--debug" in (sys.argv[1:] if argv is None else argv):
            traceback.print_exc()
        print(f"{exc.prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return BAD_INPUT
    except KeyboardInterrupt as exc:  # while the command modules import
        print("cqil: interrupted", file=sys.stderr)
        return signals.exit_code(exc)
    quiet_libraries()
    try:
        status = args.func(args)  # a command returns CHECK_FAILED when its check ran and failed
        return status or OK
    except CqilError as exc:
        error, code, line = exc, BAD_INPUT, f"error: {exc}"
    except OSError as exc:  # a file or folder that cannot be read or written: the user's to fix
        error, code, line = exc, BAD_INPUT, f"error: {_os_error_line(exc)}"
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (model/signals.py)
        code = signals.exit_code(exc)
        error, line = exc, "interrupted" if code == INTERRUPTED else f"terminated (signal {code - 128})"
    except Exception as exc:  # noqa: BLE001 - a bug: say so in one line, keep the traceback
        where = "printed above" if args.debug else _save_traceback() + "; --debug prints it"
        error, code, line = exc, INTERNAL_ERROR, f"internal error (a bug): {type(exc).__name__}: {exc} ({where})"
    _close_progress_bars()
    if args.debug:
        traceback.print_exception(error)
    print(f"cqil {args.command}: {' '.join(line.split())}", file=sys.stderr)
    return code


def _close_progress_bars() -> None:
    """End the bars an error or interrupt cut short, so that the one line starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
