"""Every `cqil` command refuses bad input the same way: exit 2, one line on stderr that names the option
or file, no traceback, and nothing written where the output would have gone.

The table runs each command with one class of bad value at a time: missing, empty, wrong type, out of
range, corrupt file, unwritable or foreign location, foreign model or adapter. The tests after it hold
the rest of the CLI contract: exit codes 1 and 3, `--debug`, `--out` never deleting a user's files,
no pickle on resume, file modes and path-independent ONNX bytes.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from cqil.model.errors import CqilError
from cqil.model.fsutil import MARKER, atomic_dir, atomic_write_text
from cqil.model.plan import Plan, model_record
from cqil.pipeline.cli import main
from safetensors.torch import save_file

from tests.engines.test_gate import bench
from tests.helpers import tiny_config, tiny_model

PRECIOUS = "keep me\n"


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    """The CLI in-process; argparse usage errors end in SystemExit, the rest return the code."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir):
    """Inputs for the table: tiny models, good and bad files of every kind the commands read."""
    root = tmp_path_factory.mktemp("bad-inputs")
    e = {"root": root, "llama": tiny_model_dir("llama", 2), "qwen2": tiny_model_dir("qwen2", 2),
         "llama4": tiny_model_dir("llama", 4)}

    e["file"] = root / "file.txt"
    e["file"].write_text("a regular file\n")
    e["busy"] = root / "busy"  # a user's folder: nothing in it may be deleted
    e["busy"].mkdir()
    (e["busy"] / "precious.txt").write_text(PRECIOUS)
    e["nested_plan"] = root / "nested-plan.json"  # a group that holds a list (issue 21)
    e["nested_plan"].write_text(json.dumps({"groups": [[[0]], [1]], "bypass": 0}))
    e["not_utf8"] = root / "latin1.txt"
    e["not_utf8"].write_bytes("caf\xe9 au lait ".encode("latin-1") * 50)
    e["csv"] = root / "data.csv"
    e["csv"].write_text("a,b\n")
    e["bad_jsonl"] = root / "bad.jsonl"
    e["bad_jsonl"].write_text('{"text": "ok"}\n{not json\n')
    e["not_json"] = root / "not.json"
    e["not_json"].write_text("{not json")
    e["json_list"] = root / "list.json"
    e["json_list"].write_text("[1, 2]")
    e["overlap"] = root / "overlap.json"
    e["overlap"].write_text(json.dumps({"groups": [[0, 1], [1]], "bypass": 0}))
    e["plan8"] = root / "plan8.json"
    Plan(tuple((i,) for i in range(8)), 0).save(e["plan8"])
    e["plan_qwen2"] = root / "plan-qwen2.json"
    Plan(((0, 1),), 0, model_record(tiny_config("qwen2", 2, architectures=["Qwen2ForCausalLM"]))).save(e["plan_qwen2"])
    e["bad_toml"] = root / "build.toml"
    e["bad_toml"].write_text("[recover\nsteps = 3\n")

    gpt2 = root / "gpt2"  # a model family CQIL does not cover
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    (gpt2 / "model.safetensors").write_bytes(b"")
    e["gpt2"] = gpt2
    broken = root / "broken-config"
    broken.mkdir()
    (broken / "config.json").write_text("{oops")
    e["broken_config"] = broken
    # A checkpoint whose weights do not fit its config (another intermediate size).
    misfit = root / "misfit"
    misfit.mkdir()
    for item in e["llama"].iterdir():
        (misfit / item.name).write_bytes(item.read_bytes())
    config = json.loads((misfit / "config.json").read_text())
    config["intermediate_size"] = 96
    (misfit / "config.json").write_text(json.dumps(config))
    e["misfit"] = misfit

    e["qwen2_adapter"] = qwen2_adapter(root / "qwen2-adapter")
    bad_adapter = root / "bad-adapter"
    bad_adapter.mkdir()
    (bad_adapter / "adapter_config.json").write_text("{oops")
    (bad_adapter / "adapter_model.safetensors").write_bytes(b"")
    e["bad_adapter"] = bad_adapter

    onnx = root / "corrupt-onnx"
    onnx.mkdir()
    (onnx / "model.onnx").write_bytes(b"\x00garbage")
    e["corrupt_onnx"] = onnx
    e["bench"] = root / "bench.json"
    e["bench"].write_text(json.dumps(bench({"decode": 0.8})))
    e["ro"] = readonly_dir(root / "ro")
    return e


def qwen2_adapter(path: Path) -> Path:
    """A LoRA adapter trained (by its record) on a Qwen2 model whose shapes equal the tiny LLaMA's."""
    model = tiny_model("llama", 2)
    path.mkdir()
    modules = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    weights = {}
    for name in modules:
        linear = model.get_submodule(name)
        weights[f"base_model.model.{name}.lora_A.weight"] = torch.zeros(4, linear.in_features)
        weights[f"base_model.model.{name}.lora_B.weight"] = torch.zeros(linear.out_features, 4)
    save_file(weights, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
        "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny-qwen2", "bias": "none"}))
    record = {"plan": Plan(((0, 1),), 0, model_record(tiny_config("qwen2", 2, architectures=["Qwen2ForCausalLM"]))).to_dict()}
    (path / "training_run.json").write_text(json.dumps(record))
    return path


def readonly_dir(path: Path) -> Path | None:
    """A folder nobody may write in: `chattr +i` (root ignores chmod), else chmod 555 for other users."""
    path.mkdir()
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        if os.geteuid() == 0:
            return None
        path.chmod(0o555)
    try:
        (path / "probe").write_text("x")
    except OSError:
        return path
    return None


@pytest.fixture(scope="module", autouse=True)
def _unlock(env):
    yield
    if env["ro"] is not None:
        subprocess.run(["chattr", "-i", str(env["ro"])], capture_output=True)
        env["ro"].chmod(0o755)


@dataclass
class Case:
    argv: list[str]  # {name} fields are env entries; {out} is this case's own output location
    names: tuple[str, ...]  # fragments the one error line must contain
    out: str = "out"  # the output location the case would write (must stay absent / unchanged)
    code: int = 2
    needs: tuple[str, ...] = field(default_factory=tuple)  # env entries that must exist (e.g. ro)


L, Q = "{llama}", "{qwen2}"
CASES: dict[str, Case] = {
    # -- missing inputs
    "eval model missing": Case(["eval", "--model", "{root}/nope"], ("nope", "does not exist")),
    "export model missing": Case(["export", "--model", "{root}/nope", "--original", "--out", "{out}"], ("nope",)),
    "analyze model missing": Case(["analyze", "--model", "{root}/nope", "--out", "{out}"], ("nope",)),
    "finetune model missing": Case(["finetune", "--model", "{root}/nope", "--steps", "1", "--out", "{out}"], ("nope",)),
    "plan file missing": Case(["plan", "--model", L, "--plan", "{root}/nope.json", "--out", "{out}"], ("--plan", "nope.json")),
    "eval adapter missing": Case(["eval", "--model", L, "--groups", "0-1", "--adapter", "{root}/nope"], ("--adapter",)),
    "merge adapter missing": Case(["merge", "--model", L, "--adapter", "{root}/nope", "--out", "{out}"], ("--adapter",)),
    "eval data missing": Case(["eval", "--model", L, "--groups", "0-1", "--data", "{root}/nope.txt"], ("--data", "nope.txt")),
    "validate onnx missing": Case(["validate", "--onnx", "{root}/nope", "--out", "{out}"], ("--onnx", "nope")),
    "bench onnx missing": Case(["bench", "--onnx", "{root}/nope", "--out", "{out}"], ("--onnx",)),
    "engine onnx missing": Case(["engine", "--onnx", "{root}/nope", "--out", "{out}"], ("--onnx",)),
    "triton onnx missing": Case(["triton", "--onnx", "{root}/nope", "--out", "{out}"], ("--onnx",)),
    "gate bench missing": Case(["gate", "{root}/nope.json", "--max-ratio", "1", "--junit", "{out}"], ("nope.json",)),
    "gate baseline missing": Case(["gate", "{bench}", "--baseline", "{root}/nope.json", "--json", "{out}"], ("--baseline",)),
    "build config missing": Case(["build", "--config", "{root}/nope.toml", "--out", "{out}"], ("--config",)),
    "verify dir missing": Case(["verify", "{root}/nope"], ("nope",)),
    "generate prompt missing": Case(["generate", "--model", L], ("--prompt",)),
    "gate rule missing": Case(["gate", "{bench}"], ("--baseline", "--max-ratio")),
    # -- empty values
    "generate empty prompt": Case(["generate", "--model", L, "--prompt", ""], ("--prompt", "must not be empty")),
    "generate prompt not utf-8": Case(["generate", "--model", L, "--prompt", "abc \udcff\udcfe def"],
                                      ("--prompt is not valid UTF-8", "0xff")),
    "plan group holds a list": Case(["generate", "--model", L, "--plan", "{nested_plan}", "--prompt", "hi"],
                                    ("plan 'groups' must be a list of lists of layer indices",)),
    "eval empty uniform": Case(["eval", "--model", L, "--uniform", " "], ("--uniform",)),
    "export empty groups": Case(["export", "--model", L, "--groups", "", "--out", "{out}"], ("--groups",)),
    "finetune empty targets": Case(["finetune", "--model", L, "--uniform", "0:2:2", "--steps", "1",
                                    "--targets", "", "--out", "{out}"], ("--targets",)),
    "triton empty name": Case(["triton", "--onnx", "{corrupt_onnx}", "--name", "", "--out", "{out}"], ("--name",)),
    "analyze empty out": Case(["analyze", "--model", L, "--out", ""], ("--out", "empty")),
    "eval empty model": Case(["eval", "--model", "", "--groups", "0-1"], ("--model", "empty")),
    "eval empty data": Case(["eval", "--model", L, "--groups", "0-1", "--data", ""], ("--data", "empty")),
    "build empty set": Case(["build", "--set", "", "--out", "{out}"], ("--set",)),
    # -- wrong type
    "eval batch size text": Case(["eval", "--model", L, "--groups", "0-1", "--batch-size", "four"],
                                 ("--batch-size four", "integer")),
    "analyze seq len float": Case(["analyze", "--model", L, "--seq-len", "1.5", "--out", "{out}"], ("--seq-len 1.5",)),
    "gate max ratio text": Case(["gate", "{bench}", "--max-ratio", "fast"], ("--max-ratio fast", "number")),
    "finetune lr text": Case(["finetune", "--model", L, "--uniform", "0:2:2", "--steps", "1", "--lr", "high",
                              "--out", "{out}"], ("--lr high",)),
    "bench batch text": Case(["bench", "--onnx", "{corrupt_onnx}", "--batch", "x", "--out", "{out}"], ("--batch x",)),
    "plan bypass text": Case(["plan", "--model", L, "--groups", "0-1", "--bypass", "one", "--out", "{out}"], ("--bypass one",)),
    "build steps text": Case(["build", "--steps", "many", "--out", "{out}"], ("--steps many",)),
    "gate max ratio nan": Case(["gate", "{bench}", "--max-ratio", "nan"], ("--max-ratio nan",)),
    "export layout unknown": Case(["export", "--model", L, "--original", "--layout", "wide", "--out", "{out}"],
                                  ("--layout wide must be one of branches, fused",)),
    "engine precision unknown": Case(["engine", "--onnx", "{corrupt_onnx}", "--precision", "int4", "--out", "{out}"],
                                     ("--precision",)),
    # -- out of range
    "eval batch size 0": Case(["eval", "--model", L, "--groups", "0-1", "--batch-size", "0"], ("--batch-size 0",)),
    "eval max chunks 0": Case(["eval", "--model", L, "--groups", "0-1", "--max-chunks", "0"], ("--max-chunks 0",)),
    "eval seq len 1": Case(["eval", "--model", L, "--groups", "0-1", "--seq-len", "1"], ("--seq-len 1",)),
    "generate max new tokens -3": Case(["generate", "--model", L, "--prompt", "hi", "--max-new-tokens", "-3"],
                                       ("--max-new-tokens -3", "at least 1")),
    "finetune steps 0": Case(["finetune", "--model", L, "--uniform", "0:2:2", "--steps", "0", "--out", "{out}"],
                             ("--steps 0",)),
    "finetune dropout 1": Case(["finetune", "--model", L, "--uniform", "0:2:2", "--steps", "1", "--lora-dropout", "1",
                                "--out", "{out}"], ("--lora-dropout 1",)),
    "finetune rank 0": Case(["finetune", "--model", L, "--uniform", "0:2:2", "--steps", "1", "--rank", "0",
                             "--out", "{out}"], ("--rank 0",)),
    "bench warmup -1": Case(["bench", "--onnx", "{corrupt_onnx}", "--warmup", "-1", "--out", "{out}"], ("--warmup -1",)),
    "validate threads 0": Case(["validate", "--onnx", "{corrupt_onnx}", "--threads", "0", "--out", "{out}"],
                               ("--threads 0",)),
    "validate decode steps -1": Case(["validate", "--onnx", "{corrupt_onnx}", "--decode-steps", "-1", "--out", "{out}"],
                                     ("--decode-steps -1",)),
    "gate max ratio 0": Case(["gate", "{bench}", "--max-ratio", "0", "--junit", "{out}"], ("--max-ratio 0",)),
    "gate tolerance negative": Case(["gate", "{bench}", "--baseline", "{bench}", "--tolerance", "-0.1"], ("--tolerance -0.1",)),
    "engine opt batch 0": Case(["engine", "--onnx", "{corrupt_onnx}", "--opt-batch", "0", "--out", "{out}"], ("--opt-batch 0",)),
    "plan proxy keep 0": Case(["plan", "--model", L, "--auto", "--target-depth", "1", "--proxy-keep", "0",
                               "--out", "{out}"], ("--proxy-keep 0",)),
    "plan target depth 0": Case(["plan", "--model", L, "--auto", "--target-depth", "0", "--out", "{out}"],
                                ("--target-depth 0",)),
    "plan bypass too large": Case(["plan", "--model", L, "--groups", "0-1", "--bypass", "3", "--out", "{out}"],
                                  ("bypass distance 3",)),
    "plan groups outside model": Case(["plan", "--model", L, "--groups", "1-2", "--out", "{out}"], ("layer 2",)),
    "plan prune every layer": Case(["plan", "--model", L, "--prune", "99", "--out", "{out}"], ("--prune 99",)),
    "plan cost model not json": Case(["plan", "--model", L, "--auto", "--latency-budget", "0.8", "--cost-model",
                                      "{not_json}", "--out", "{out}"], ("not.json", "not valid JSON")),
    "plan latency budget without cost model": Case(["plan", "--model", L, "--auto", "--latency-budget", "0.8",
                                                    "--out", "{out}"], ("--cost-model",)),
    "compare plans not name=file": Case(["compare", "--model", L, "--plans", "a"], ("NAME=plan.json",)),
    "build bypass -1": Case(["build", "--bypass", "-1", "--out", "{out}"], ("--bypass -1",)),
    # -- corrupt or malformed files
    "plan file not json": Case(["eval", "--model", L, "--plan", "{not_json}"], ("not.json", "not valid JSON")),
    "plan file a list": Case(["eval", "--model", L, "--plan", "{json_list}"], ("list.json", "JSON object")),
    "plan groups overlap": Case(["plan", "--model", L, "--plan", "{overlap}", "--out", "{out}"],
                                ("layer 1 is in two groups", "overlap")),
    "official not json": Case(["plan", "--model", L, "--official", "{not_json}", "--out", "{out}"], ("--official",)),
    "eval data not utf8": Case(["eval", "--model", L, "--groups", "0-1", "--eval-data", "{not_utf8}"],
                               ("--eval-data", "latin1.txt", "not UTF-8")),
    "eval data bad jsonl": Case(["eval", "--model", L, "--groups", "0-1", "--data", "{bad_jsonl}"], ("bad.jsonl:2",)),
    "analyze data csv": Case(["analyze", "--model", L, "--data", "{csv}", "--out", "{out}"], ("data.csv",)),
    "gate bench not json": Case(["gate", "{not_json}", "--max-ratio", "1"], ("not.json",)),
    "build config bad toml": Case(["build", "--config", "{bad_toml}", "--out", "{out}"], ("build.toml", "TOML")),
    "model config not json": Case(["eval", "--model", "{broken_config}", "--groups", "0-1"], ("broken-config",)),
    "model weights misfit config": Case(["generate", "--model", "{misfit}", "--prompt", "hi"],
                                        ("misfit", "do not fit its config.json", "intermediate_size")),
    "validate onnx corrupt": Case(["validate", "--onnx", "{corrupt_onnx}", "--out", "{out}"], ("not a readable ONNX",)),
    "adapter config not json": Case(["eval", "--model", L, "--groups", "0-1", "--adapter", "{bad_adapter}"],
                                    ("adapter_config.json",)),
    "model is a text file": Case(["export", "--model", "{file}", "--original", "--out", "{out}"], ("not a .gguf",)),
    # -- unwritable or foreign output locations
    "export out under a file": Case(["export", "--model", L, "--original", "--out", "{file}/sub"],
                                    ("file.txt' is a file",), out="{file}/sub"),
    "plan out under a file": Case(["plan", "--model", L, "--groups", "0-1", "--out", "{file}/plan.json"],
                                  ("file.txt' is a file",), out="{file}/plan.json"),
    "validate out under a file": Case(["validate", "--onnx", "{corrupt_onnx}", "--out", "{file}/v.json"],
                                      ("--out", "file.txt"), out="{file}/v.json"),
    "gate junit under a file": Case(["gate", "{bench}", "--max-ratio", "1", "--junit", "{file}/g.xml"],
                                    ("--junit", "file.txt"), out="{file}/g.xml"),
    "engine out is a folder": Case(["engine", "--onnx", "{corrupt_onnx}", "--out", "{busy}"], ("--out", "is a folder"),
                                   out="{busy}"),
    "analyze out is a file": Case(["analyze", "--model", L, "--out", "{file}"], ("--out", "is a file"), out="{file}"),
    "export into a user's folder": Case(["export", "--model", L, "--original", "--out", "{busy}"],
                                        ("--out", "cqil did not write"), out="{busy}"),
    "merge into a user's folder": Case(["merge", "--model", L, "--groups", "0-1", "--adapter", "{qwen2_adapter}",
                                        "--out", "{busy}"], ("cqil did not write",), out="{busy}"),
    "finetune into a user's folder": Case(["finetune", "--model", L, "--uniform", "0:2:2", "--steps", "1",
                                           "--out", "{busy}"], ("cqil did not write",), out="{busy}"),
    "analyze into a user's folder": Case(["analyze", "--model", L, "--out", "{busy}"], ("cqil did not write",),
                                         out="{busy}"),
    "build into a user's folder": Case(["build", "--out", "{busy}"], ("cqil did not write",), out="{busy}"),
    "finetune checkpoint in a user's folder": Case(["finetune", "--model", L, "--uniform", "0:2:2", "--steps", "1",
                                                    "--checkpoint-dir", "{busy}", "--out", "{out}"],
                                                   ("--checkpoint-dir",)),
    "export out is the current folder": Case(["export", "--model", L, "--original", "--out", "."], ("current",), out="."),
    "export out read-only": Case(["export", "--model", L, "--original", "--out", "{ro}/onnx"], ("cannot write",),
                                 out="{ro}/onnx", needs=("ro",)),
    "plan out read-only": Case(["plan", "--model", L, "--groups", "0-1", "--out", "{ro}/plan.json"], ("cannot write",),
                               out="{ro}/plan.json", needs=("ro",)),
    "gate junit read-only": Case(["gate", "{bench}", "--max-ratio", "1", "--junit", "{ro}/g.xml"],
                                 ("--junit", "cannot write"), out="{ro}/g.xml", needs=("ro",)),
    "validate out read-only": Case(["validate", "--onnx", "{corrupt_onnx}", "--out", "{ro}/v.json"], ("cannot write",),
                                   out="{ro}/v.json", needs=("ro",)),
    "build out read-only": Case(["build", "--out", "{ro}/b"], ("cannot write",), out="{ro}/b", needs=("ro",)),
    # -- a model, plan or adapter of another kind
    "gpt2 model": Case(["eval", "--model", "{gpt2}", "--groups", "0-1"], ("'gpt2' model",)),
    "plan for 8 layers": Case(["eval", "--model", L, "--plan", "{plan8}"], ("covers 8 layers but the model has 2",)),
    "plan for qwen2 on llama": Case(["export", "--model", L, "--plan", "{plan_qwen2}", "--out", "{out}"],
                                    ("made for a 'qwen2' model",)),
    "qwen2 adapter on llama (eval)": Case(["eval", "--model", L, "--groups", "0-1", "--adapter", "{qwen2_adapter}",
                                           "--max-chunks", "1", "--seq-len", "16"], ("qwen2-adapter", "another model")),
    "qwen2 adapter on llama (merge)": Case(["merge", "--model", L, "--groups", "0-1", "--adapter", "{qwen2_adapter}",
                                            "--out", "{out}"], ("another model", "Qwen2ForCausalLM")),
    "llama4 adapter plan on llama2": Case(["merge", "--model", "{llama4}", "--adapter", "{qwen2_adapter}",
                                           "--out", "{out}"], ("another model",)),
    # -- options that exclude each other
    "two plan sources": Case(["eval", "--model", L, "--groups", "0-1", "--uniform", "0:2:2"], ("--uniform", "--groups")),
    "bypass without a plan": Case(["generate", "--model", L, "--prompt", "hi", "--bypass", "1"], ("--bypass",)),
    "original with a plan": Case(["export", "--model", L, "--original", "--groups", "0-1", "--out", "{out}"],
                                 ("--original", "--groups")),
    "auto with a bypass": Case(["plan", "--model", L, "--auto", "--target-depth", "1", "--bypass", "1",
                                "--out", "{out}"], ("drop --bypass",)),
}


def fill(text: str, env: dict, out: Path) -> str:
    return text.format(out=out, **{k: v for k, v in env.items() if isinstance(v, Path)})


def snapshot(path: Path):
    """What is at `path`: None, a file's bytes, or a folder's {relative name: bytes}."""
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_the_table_covers_every_command():
    from cqil.pipeline.cli import COMMAND_MODULES

    assert len(CASES) >= 60
    assert {case.argv[0] for case in CASES.values()} == set(COMMAND_MODULES)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, env, tmp_path, capsys, monkeypatch):
    case = CASES[name]
    for need in case.needs:
        if env[need] is None:
            pytest.skip(f"no {need} location can be made on this machine")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CQIL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    target = Path(fill(case.out, env, out)) if case.out != "out" else out
    before = snapshot(target)
    code, stdout, err = run(capsys, [fill(arg, env, out) for arg in case.argv])
    lines = err.strip().splitlines()
    assert code == case.code, (code, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"cqil {case.argv[0]}: error: "), lines[0]
    for fragment in case.names:
        assert fragment in lines[0], (fragment, lines[0])
    assert snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == []  # no temporaries, no defaults
    assert (env["busy"] / "precious.txt").read_text() == PRECIOUS


# -- --out never deletes what cqil did not write --------------------------------------------------------------

def test_atomic_dir_replaces_only_its_own_folders(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "precious.txt").write_text(PRECIOUS)
    with pytest.raises(CqilError, match="cqil did not write"):
        with atomic_dir(user) as tmp:
            (tmp / "new.txt").write_text("new")
    assert (user / "precious.txt").read_text() == PRECIOUS and not (user / "new.txt").exists()

    ours = tmp_path / "ours"
    for text in ("first", "second"):  # an earlier output of ours is replaced as a whole
        with atomic_dir(ours) as tmp:
            (tmp / f"{text}.txt").write_text(text)
    assert sorted(p.name for p in ours.iterdir()) == [MARKER, "second.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "user"]


def test_export_refuses_a_users_folder_and_replaces_its_own(tiny_model_dir, tmp_path, capsys):
    model = str(tiny_model_dir("llama", 2))
    out = tmp_path / "d"
    out.mkdir()
    (out / "precious.txt").write_text(PRECIOUS)
    code, _, err = run(capsys, ["export", "--model", model, "--original", "--out", str(out)])
    assert code == 2 and "cqil did not write" in err
    assert snapshot(out) == {"precious.txt": PRECIOUS.encode()}
    (out / "precious.txt").unlink()  # an empty folder is fine, and a second export replaces the first
    assert run(capsys, ["export", "--model", model, "--original", "--out", str(out)])[0] == 0
    first = snapshot(out)
    assert run(capsys, ["export", "--model", model, "--original", "--out", str(out)])[0] == 0
    assert snapshot(out) == first and (out / MARKER).is_file()


# -- exit codes ----------------------------------------------------------------------------------------------

def test_internal_error_is_exit_3_with_one_line_and_a_saved_traceback(tmp_path, capsys, monkeypatch):
    import cqil.engines.gate

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a planted bug")

    monkeypatch.setattr(cqil.engines.gate, "check_max_ratio", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    bench = tmp_path / "bench.json"
    bench.write_text("{}")
    monkeypatch.setattr(cqil.engines.gate, "load_bench", lambda path: None)
    code, _, err = run(capsys, ["gate", str(bench), "--max-ratio", "1"])
    [line] = err.strip().splitlines()
    assert code == 3 and "internal error" in line and "ZeroDivisionError: a planted bug" in line
    saved = Path(line.split("traceback in ")[1].split(";")[0])
    assert "Traceback" in saved.read_text() and "a planted bug" in saved.read_text()
    code, _, err = run(capsys, ["--debug", "gate", str(bench), "--max-ratio", "1"])
    assert code == 3 and "Traceback" in err  # --debug shows it, the code stays


def test_debug_never_changes_the_exit_code(tmp_path, capsys):
    (tmp_path / "x.json").write_text("{not json")
    for argv in (["gate", str(tmp_path / "nope.json"), "--max-ratio", "1"],  # refused while parsing
                 ["gate", str(tmp_path / "x.json"), "--max-ratio", "1"],  # refused by the command
                 ["eval", "--model", str(tmp_path / "nope")]):
        plain = run(capsys, argv)
        debug = run(capsys, ["--debug", *argv])
        assert plain[0] == debug[0] == 2 and "Traceback" in debug[2]


def test_a_failed_check_is_exit_1_and_a_write_error_is_exit_2(env, tmp_path, capsys, monkeypatch):
    assert run(capsys, ["gate", str(env["bench"]), "--max-ratio", "0.5"])[0] == 1
    import cqil.model.fsutil as fsutil

    def full_disk(path, data):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(fsutil, "atomic_write_bytes", full_disk)
    code, out, err = run(capsys, ["gate", str(env["bench"]), "--max-ratio", "1", "--junit", str(tmp_path / "g.xml")])
    assert code == 2 and err.strip().splitlines() == [
        f"cqil gate: error: No space left on device: '{tmp_path / 'g.xml'}'"]
    assert "gate passed" not in out  # no verdict before the report it promises is on disk


def test_gate_with_an_unwritable_junit_says_nothing_but_the_error(env, capsys):
    if env["ro"] is None:
        pytest.skip("no read-only location can be made on this machine")
    code, out, err = run(capsys, ["gate", str(env["bench"]), "--max-ratio", "1", "--junit", str(env["ro"] / "g.xml")])
    assert code == 2 and out == "" and "--junit" in err


def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for line in ("0  success", "1  a check ran and failed", "2  bad input", "3  an internal error",
                 "130  interrupted (Ctrl-C", "143  terminated (SIGTERM)"):
        assert line in text


# -- no pickle on resume -------------------------------------------------------------------------------------

class Payload:
    """Unpickling this runs code: it creates the file named in `path`."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_resume_refuses_a_checkpoint_that_needs_pickle(tiny_model_dir, tmp_path, capsys):
    checkpoint = tmp_path / "adapter.checkpoint"
    checkpoint.mkdir()
    (checkpoint / MARKER).write_text("")  # whoever made it can forge the marker too
    ran = tmp_path / "code-ran"
    torch.save({"identity": {}, "run": {}, "lora": {}, "optimizer": {}, "scheduler": {},
                "rng": Payload(str(ran))}, checkpoint / "state.pt")
    code, _, err = run(capsys, ["finetune", "--model", str(tiny_model_dir("llama", 2)), "--uniform", "0:2:2",
                                "--steps", "2", "--seq-len", "16", "--max-chunks", "4", "--eval-chunks", "1",
                                "--rank", "2", "--resume", "--out", str(tmp_path / "adapter")])
    assert code == 2 and "only pickle can load" in err and len(err.strip().splitlines()) == 1
    assert not ran.exists() and not (tmp_path / "adapter").exists()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(checkpoint / "state.pt", weights_only=True)
    torch.load(checkpoint / "state.pt", weights_only=False)  # the payload is live: pickle runs it
    assert ran.exists()


# -- files readable under the umask, the same bytes however a path is typed ----------------------------------

def test_written_files_follow_the_umask(tiny_model_dir, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        plan = tmp_path / "plan.json"
        assert run(capsys, ["plan", "--model", str(tiny_model_dir("llama", 2)), "--groups", "0-1",
                            "--out", str(plan)])[0] == 0
        atomic_write_text(tmp_path / "any.txt", "x")
    finally:
        os.umask(old)
    for path in (plan, tmp_path / "any.txt"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_onnx_bytes_do_not_depend_on_the_model_paths_spelling_or_place(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The same model exports the same model.onnx however its path is typed and wherever its folder lies;
    each folder records its own source path, resolved and absolute."""
    from cqil.export.contract import read_contract

    here = tiny_model_dir("llama", 2)
    there = Path(shutil.copytree(here, tmp_path / "elsewhere" / here.name))  # same name, another place
    monkeypatch.chdir(here.parent)
    spellings = {"plain": (str(here), here), "dotted": (f"./{here.name}/../{here.name}", here),
                 "elsewhere": (str(there), there)}
    outputs = {}
    for label, (spelling, model) in spellings.items():
        out = tmp_path / f"onnx-{label}"
        assert run(capsys, ["export", "--model", spelling, "--groups", "0-1", "--out", str(out)])[0] == 0
        outputs[label] = snapshot(out)
        assert read_contract(out / "model.onnx").source_model()["path"] == str(model.resolve())
    assert outputs["dotted"] == outputs["plain"]
    assert str(here.resolve()) in outputs["plain"]["cqil_source.json"].decode()
    differ = {name for name in outputs["plain"] if outputs["plain"][name] != outputs["elsewhere"][name]}
    assert differ == {"cqil_source.json"}
