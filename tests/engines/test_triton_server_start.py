"""run_server's readiness wait (engines/triton_server.py) against a stand-in `tritonserver`: a script that,
like Triton, answers on its HTTP port before its metrics port is open."""

from __future__ import annotations

import sys
import textwrap
import urllib.request
from pathlib import Path

from cqil.engines import triton_server

# Serves 200 on --http-port at once and on --metrics-port only METRICS_DELAY_S later, until terminated.
FAKE_SERVER = textwrap.dedent("""\
    #!{python}
    import http.server, sys, threading, time
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"nv_inference_count 0\\n")

        def log_message(self, *_):
            pass

    def serve(port):
        http.server.ThreadingHTTPServer(("127.0.0.1", int(port)), Ok).serve_forever()

    threading.Thread(target=serve, args=(args["--http-port"],), daemon=True).start()
    time.sleep({delay})
    serve(args["--metrics-port"])
""")
METRICS_DELAY_S = 1.5


def test_the_server_is_ready_only_once_its_metrics_endpoint_answers(tmp_path, monkeypatch):
    server = tmp_path / "server"
    (server / "bin").mkdir(parents=True)
    binary = server / "bin" / "tritonserver"
    binary.write_text(FAKE_SERVER.format(python=sys.executable, delay=METRICS_DELAY_S))
    binary.chmod(0o755)
    monkeypatch.setattr(triton_server, "pytriton_server", lambda: (server, tmp_path))
    monkeypatch.setattr(triton_server, "python_backend_dir", lambda server, root: Path(root))
    with triton_server.run_server(tmp_path / "repo", tmp_path, "cqil_text", metrics=True) as started, \
            urllib.request.urlopen(f"http://127.0.0.1:{started.metrics_port}/metrics", timeout=5) as response:
        assert response.status == 200
