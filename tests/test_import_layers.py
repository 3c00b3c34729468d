"""The folder-level import order (DESIGN.md section 3), checked by scripts/import_layers.py."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("import_layers", ROOT / "scripts" / "import_layers.py")
import_layers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(import_layers)


def test_no_folder_imports_one_above_it():
    counts = import_layers.arrows()
    assert counts[("pipeline", "model")] > 0  # the scan sees the package's real imports
    assert import_layers.upward(counts) == []


def test_an_import_inside_a_function_running_up_is_caught(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "plan.py").write_text("def f():\n    from cqil.engines import gate\n")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "a.py").write_text("from cqil.model import plan\nfrom cqil import pipeline\n")
    counts = import_layers.arrows(tmp_path)
    assert sorted(import_layers.upward(counts)) == [("export", "pipeline"), ("model", "engines")]
