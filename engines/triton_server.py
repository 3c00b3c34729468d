"""A local `tritonserver` from the nvidia-pytriton wheel, started the way pytriton starts it: the server the
slow tests and the load test (scripts/load_test.py) run the model repository on (docs/triton.md).

The wheel ships the server binary, its libraries, the Python backend and per-Python stubs, for CPU.
Its stub was built against numpy 1 and misreads numpy 2 arrays, which strings cannot avoid, so the
text model runs under `stub_python_bin()`: a virtualenv with numpy < 2 and this environment's
onnxruntime and transformers, made once in the cqil cache.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cqil.model.errors import CqilError
from cqil.model.fsutil import cache_dir

READY_TIMEOUT_S = 180
STUB_VENV = "triton-numpy1"


@dataclass
class Server:
    process: subprocess.Popen
    grpc_port: int
    http_port: int
    metrics_port: int | None
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def pytriton_server() -> tuple[Path, Path]:
    """The tritonserver folder and the bundled libraries folder inside the installed nvidia-pytriton."""
    spec = importlib.util.find_spec("pytriton")  # finds the package without importing its Python API
    if spec is None or not spec.submodule_search_locations:
        raise CqilError("nvidia-pytriton is not installed: `pip install --no-deps nvidia-pytriton==0.7.0` "
                        "(docs/triton.md)")
    root = Path(spec.submodule_search_locations[0])
    server, libs = root / "tritonserver", root.parent / "nvidia_pytriton.libs"
    if not (server / "bin" / "tritonserver").is_file() or not libs.is_dir():
        raise CqilError(f"no tritonserver binary under {server} (or no {libs}): reinstall nvidia-pytriton")
    return server, libs


def python_backend_dir(server: Path, root: Path) -> Path:
    """A backend directory whose python/ holds the backend and the stub built for this interpreter."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise CqilError(f"nvidia-pytriton has no Python-backend stub for Python {version} ({stub})")
    backend = root / "backends" / "python"
    backend.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        if not (backend / name).exists():
            (backend / name).symlink_to(server / "backends" / "python" / name)
    if not (backend / "triton_python_backend_stub").exists():
        (backend / "triton_python_backend_stub").symlink_to(stub)
    return backend.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stub_python_bin() -> Path:
    """bin/ of the numpy < 2 virtualenv the pytriton 0.7 stub needs for the text model, made once with pip."""
    from importlib import metadata

    venv = cache_dir() / "venvs" / STUB_VENV
    if (venv / "bin" / "python").is_file():
        return venv / "bin"
    venv.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{venv.name}.", dir=venv.parent))
    packages = ["numpy<2", *(f"{name}=={metadata.version(name)}" for name in ("onnxruntime", "transformers"))]
    try:
        subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True)
        subprocess.run([str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", *packages], check=True,
                       capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CqilError(f"could not make the numpy<2 environment for the Triton stub ({' '.join(packages)}):\n"
                        f"{exc.stderr}") from None
    tmp.rename(venv)
    return venv / "bin"


def _answers(url: str) -> bool:
    """Whether `url` answers 200 now (a port not open yet is no error)."""
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as response:
        return response.status == 200
    return False


def _log_tail(path: Path) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-25:])


@contextlib.contextmanager
def run_server(repo: Path, work: Path, model: str, python_bin: Path | None = None,
               metrics: bool = False) -> Iterator[Server]:
    """Start tritonserver with only `model` loaded, wait until it is ready, stop it on exit.

    `python_bin`: the bin/ of the Python environment the backend's stub runs in (default: this one's).
    `metrics`: Triton's metrics endpoint (its own metrics and the models' custom ones) on a free port.
    """
    server, libs = pytriton_server()
    backends = python_backend_dir(server, Path(work))
    grpc_port, http_port = free_port(), free_port()
    metrics_port = free_port() if metrics else None
    env = dict(os.environ)
    # The stub embeds libpython: prefer this interpreter's own, and put the environment's python first on
    # PATH so the embedded interpreter finds its site-packages (numpy, onnxruntime), as pytriton does.
    env["LD_LIBRARY_PATH"] = ":".join(filter(None, (sysconfig.get_config_var("LIBDIR"), str(libs),
                                                   env.get("LD_LIBRARY_PATH"))))
    env["PATH"] = f"{python_bin or Path(sys.executable).parent}:{env.get('PATH', '')}"
    command = [str(server / "bin" / "tritonserver"), "--model-repository", str(repo),
               "--model-control-mode", "explicit", "--load-model", model,
               "--backend-directory", str(backends), "--grpc-port", str(grpc_port),
               "--http-port", str(http_port)]
    command += ["--allow-metrics", "true", "--allow-gpu-metrics", "false", "--metrics-port", str(metrics_port)] \
        if metrics else ["--allow-metrics", "false"]
    log_path = Path(work) / "tritonserver.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    # The model's readiness, and the metrics endpoint, which Triton opens after the HTTP one.
    pending = [f"http://127.0.0.1:{http_port}/v2/models/{model}/ready"]
    pending += [f"http://127.0.0.1:{metrics_port}/metrics"] if metrics else []
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise CqilError(f"tritonserver exited with status {process.returncode}:\n{_log_tail(log_path)}")
            pending = [url for url in pending if not _answers(url)]
            if not pending:
                break
            if time.monotonic() > deadline:
                raise CqilError(f"{model} not ready after {READY_TIMEOUT_S} s:\n{_log_tail(log_path)}")
            time.sleep(0.5)
        yield Server(process, grpc_port, http_port, metrics_port, log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
