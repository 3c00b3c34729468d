"""Ctrl-C (SIGINT) exits 130 and SIGTERM 143, with one line, in a real `python -m cqil` build at several
points and in a real `generate --ranks 2`; no interrupt is lost in a finalizer; killing the `--ranks`
launcher with SIGKILL kills its ranks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers import build_args

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
LINES = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated (signal 15)"}


def cqil(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cqil", *args], env=ENV, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the command ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"never reached {what}"
        time.sleep(0.02)


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def last_line(err: str) -> str:
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def test_an_interrupt_raised_inside_a_finalizer_is_not_lost():
    script = textwrap.dedent("""
        import gc, signal, time
        from cqil.model import signals
        signals.install()

        class Finalized:
            def __del__(self):
                signal.raise_signal(signal.SIGINT)  # the handler runs here, where Python drops exceptions

        try:
            Finalized()
            gc.collect()
            for _ in range(300):
                time.sleep(0.01)
            print("swallowed")
        except KeyboardInterrupt as exc:
            print("raised", signals.exit_code(exc))
    """)
    result = subprocess.run([sys.executable, "-c", script], env=ENV, cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.strip() == "raised 130" and "Exception ignored" not in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_every_command_exits_128_plus_the_signal(signum, tmp_path, monkeypatch, capsys):
    from cqil.model.errors import Interrupted
    from cqil.pipeline.cli import main
    from cqil.pipeline.commands import verify

    def interrupted(args):
        raise Interrupted(signum) if signum == signal.SIGTERM else KeyboardInterrupt

    monkeypatch.setattr(verify, "cmd_verify", interrupted)
    capsys.readouterr()
    assert main(["verify", str(tmp_path)]) == CODES[signum]
    assert capsys.readouterr().err == f"cqil verify: {LINES[signum]}\n"


# (stage whose temporary folder appears, seconds after that, signal): before, inside and after recovery; both
# signals inside recovery, whose first Ctrl-C finishes the step, and one inside torch.export.
# The slow suite adds SIGTERM inside recovery; the fast suite keeps one case of each stage.
POINTS = [("analyze", 0.0, signal.SIGINT), ("recover", 0.3, signal.SIGINT),
          pytest.param("recover", 0.3, signal.SIGTERM, marks=pytest.mark.slow), ("export", 1.0, signal.SIGINT)]


POINT_IDS = ["analyze+0.0s-SIGINT", "recover+0.3s-SIGINT", "recover+0.3s-SIGTERM", "export+1.0s-SIGINT"]


@pytest.mark.parametrize("stage, delay, signum", POINTS, ids=POINT_IDS)
def test_a_signalled_build_exits_128_plus_the_signal_with_one_line(tiny_model_dir, tmp_path, stage, delay, signum):
    out = tmp_path / "build"
    proc = cqil(*build_args(tiny_model_dir("llama"), out))
    wait_for(lambda: list(out.glob(f".{stage}.tmp-*")), proc, f"the {stage} stage")
    time.sleep(delay)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == CODES[signum], err[-2000:]
    assert last_line(err) == f"cqil build: {LINES[signum]}"
    assert "Traceback" not in err and "Exception ignored" not in err
    assert not list(out.glob(f".{stage}.tmp-*")) and not (out / stage).exists()  # nothing half-written


def rank_pids(launcher: subprocess.Popen) -> list[int]:
    return [pid for pid in children(launcher.pid)
            if "rank_worker" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]


def start_generate(tiny_model_dir) -> tuple[subprocess.Popen, list[int]]:
    proc = cqil("generate", "--ranks", "2", "--backend", "gloo", "--model", str(tiny_model_dir("llama", 6)),
                "--groups", "1-2,3-4", "--prompt", "A", "--max-new-tokens", "500")
    wait_for(lambda: len(rank_pids(proc)) == 2, proc, "two ranks", timeout=120)
    return proc, rank_pids(proc)


# running-SIGINT runs in the slow suite
RANK_POINTS = [(0.0, signal.SIGINT), pytest.param(2.0, signal.SIGINT, marks=pytest.mark.slow), (2.0, signal.SIGTERM)]


@pytest.mark.parametrize("delay, signum", RANK_POINTS, ids=["starting-SIGINT", "running-SIGINT", "running-SIGTERM"])
def test_a_signalled_ranks_run_stops_every_rank_with_one_line(tiny_model_dir, delay, signum):
    proc, ranks = start_generate(tiny_model_dir)
    time.sleep(delay)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == CODES[signum], err[-2000:]
    assert [line for line in err.splitlines() if line.strip()] == [f"cqil generate: {LINES[signum]}"]
    assert not any(alive(pid) for pid in ranks)


@pytest.mark.slow  # two ranks started and the launcher SIGKILLed: 10 s, in the slow suite
def test_killing_the_launcher_kills_its_ranks(tiny_model_dir):
    proc, ranks = start_generate(tiny_model_dir)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in ranks)


@pytest.mark.parametrize("raised", [None, RuntimeError], ids=["loop-ended", "loop-failed"])
def test_a_ctrl_c_that_the_recovery_loop_outlived_still_stops(raised):
    """The first Ctrl-C of a recovery asks the loop to finish its step; if the loop ends then (last step,
    early stop) the interrupt must still end the command, not be forgotten."""
    from cqil.pipeline.recovery import StopOnInterrupt

    with pytest.raises(raised or KeyboardInterrupt):
        with StopOnInterrupt() as stop:
            signal.raise_signal(signal.SIGINT)  # handled by StopOnInterrupt: the loop goes on
            assert stop.requested
            if raised:
                raise raised("the step failed")  # that error, not a second exception, reaches the caller
