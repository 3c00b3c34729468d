"""A Triton Inference Server model repository for the exported decoder (issue 6, item 3).

    <repo>/<name>_onnx/config.pbtxt       backend "onnxruntime"
                       1/model.onnx       + its external data, at the same relative locations
    <repo>/<name>_trt/config.pbtxt        platform "tensorrt_plan"   (only when an engine is given)
                      1/model.plan
    <repo>/<name>_python/config.pbtxt     backend "python": ONNX Runtime on CPU inside Triton
                         1/model.py       + model.onnx and its data (hard links to the _onnx copy)
    <repo>/<name>_text/config.pbtxt       backend "python", decoupled: text in, text out (generate extension)
                       1/model.py         + triton_text_scheduler.py (in-flight batching), model.onnx
                                          (last-position logits), its data, the tokenizer and generation config
                                          (only when the export folder holds its tokenizer files)

Every model declares the ONNX graph's own inputs and outputs (DESIGN.md section 4) with their dtypes
and dims, -1 where the graph has a symbolic dim, and `max_batch_size: 0` because batch is already an
explicit dynamic dim; so a client sends the same tensors to any of the three. The text model instead
declares the inputs and output of Triton's generate extension (`text_input` -> `text_output`, as the
vLLM and TensorRT-LLM backends do), keeps the KV cache inside and batches requests in flight. The
configs are plain text here (no Triton import needed to write them); the tests parse them with
Triton's ModelConfig schema.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx as onnx_lib
from cqil.export.contract import (
    PLAN_KEY,
    TARGET_KEY,
    ContractSpec,
    find_onnx,
    output_names,
    read_contract,
)
from cqil.export.last_logits import keep_last_position_logits
from cqil.export.standalone import inline_contract
from cqil.model.errors import CqilError
from cqil.model.fsutil import atomic_dir, link_or_copy
from onnx.external_data_helper import uses_external_data

ONNX_TO_TRITON = {"INT64": "TYPE_INT64", "INT32": "TYPE_INT32", "FLOAT": "TYPE_FP32",
                  "FLOAT16": "TYPE_FP16", "BFLOAT16": "TYPE_BF16"}
# `cqil engine` builds two optimization profiles (0 prefill, 1 decode); Triton uses only profile 0
# unless the instance group lists them.
ENGINE_PROFILES = ("0", "1")
PYTHON_MODEL_SOURCE = Path(__file__).with_name("triton_python_model.py")
TEXT_MODEL_SOURCE = Path(__file__).with_name("triton_generate_model.py")
# Copied beside the text model's model.py, which imports it (the backend runs without the cqil package).
TEXT_SCHEDULER_SOURCE = Path(__file__).with_name("triton_text_scheduler.py")
VERSION = "1"
# What the text model reads beside model.onnx: the tokenizer (both files needed) and the configs.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
TEXT_SIDE_FILES = (*TOKENIZER_FILES, "special_tokens_map.json", "chat_template.jinja", "config.json",
                   "generation_config.json")
# The generate extension's tensors, as the vLLM and TensorRT-LLM backends name and type them.
TEXT_INPUTS = (("text_input", "TYPE_STRING", 1, False), ("max_tokens", "TYPE_INT32", 1, True),
               ("stream", "TYPE_BOOL", 1, True), ("temperature", "TYPE_FP32", 1, True),
               ("top_p", "TYPE_FP32", 1, True), ("top_k", "TYPE_INT32", 1, True),
               ("random_seed", "TYPE_UINT64", 1, True), ("stop", "TYPE_STRING", -1, True),
               ("exclude_input_in_output", "TYPE_BOOL", 1, True), ("sampling_parameters", "TYPE_STRING", 1, True),
               ("return_finish_reason", "TYPE_BOOL", 1, True), ("return_num_output_tokens", "TYPE_BOOL", 1, True))
TEXT_OUTPUTS = (("text_output", "TYPE_STRING"), ("finish_reason", "TYPE_STRING"), ("num_output_tokens", "TYPE_UINT32"))
# The in-flight batching limits (model.py's DEFAULT_PARAMETERS): rows per graph call, waiting requests,
# padded prompt tokens prefilled per step (bounds the stall joiners put on running rows; 0: no cap),
# decode steps a waiting request may be held for others to share its prefill (0: joins at once),
# the largest max_tokens a request may ask, ONNX Runtime intra-op threads (0: its default, every core).
TEXT_PARAMETERS = {"max_batch": 16, "max_queue": 64, "max_prefill_tokens": 1024, "join_wait_steps": 4,
                   "max_tokens_limit": 512, "onnxruntime_threads": 0}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton's name, e.g. TYPE_FP32
    dims: tuple[int, ...]  # -1 for a dynamic dim


@dataclass(frozen=True)
class GraphIO:
    """What the configs need from the ONNX file: its contract, tensors and external data files."""

    onnx: Path
    spec: ContractSpec
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    external_data: tuple[str, ...]  # locations relative to the ONNX file's folder
    target: str = "portable"  # the export's --target (contract.TARGET_KEY)


@dataclass(frozen=True)
class Repository:
    path: Path
    models: dict[str, str]  # model name -> what serves it
    io: GraphIO


def model_names(model_name: str) -> dict[str, str]:
    return {kind: f"{model_name}_{kind}" for kind in ("onnx", "trt", "python", "text")}


def has_tokenizer(onnx_folder: Path) -> bool:
    return all((Path(onnx_folder) / name).is_file() for name in TOKENIZER_FILES)


def read_graph_io(onnx: Path) -> GraphIO:
    """Check the file against the contract and read its tensors (declarations only, not the weights)."""
    path = find_onnx(onnx)
    spec = read_contract(path)
    model = onnx_lib.load(str(path), load_external_data=False)
    outputs = [value.name for value in model.graph.output]
    missing = [name for name in output_names(spec.num_layers) if name not in outputs]
    unknown = sorted(set(outputs) - set(output_names(spec.num_layers)))
    if missing or unknown:
        problem = f"lacks outputs {', '.join(missing)}" if missing else f"has outputs outside the contract: {', '.join(unknown)}"
        raise CqilError(f"'{path}' {problem}: it does not follow the cqil ONNX contract (export it with `cqil export`)")
    inputs = tuple(_tensor(value, path) for value in model.graph.input)
    target = {prop.key: prop.value for prop in model.metadata_props}.get(TARGET_KEY, "portable")
    return GraphIO(path, spec, inputs, tuple(_tensor(value, path) for value in model.graph.output),
                   _external_data(model, path), target)


def _tensor(value, path: Path) -> TensorSpec:
    tensor_type = value.type.tensor_type
    elem = onnx_lib.TensorProto.DataType.Name(tensor_type.elem_type)
    if elem not in ONNX_TO_TRITON:
        raise CqilError(f"'{path}': tensor {value.name} has type {elem}, which the Triton configs do not map "
                        f"(supported: {', '.join(ONNX_TO_TRITON)})")
    if not tensor_type.HasField("shape"):
        raise CqilError(f"'{path}': tensor {value.name} declares no shape: export it again with `cqil export`")
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim)
    return TensorSpec(value.name, ONNX_TO_TRITON[elem], dims)


def _external_data(model, path: Path) -> tuple[str, ...]:
    locations = set()
    for tensor in _all_tensors(model.graph):
        if uses_external_data(tensor):
            locations.add(next(entry.value for entry in tensor.external_data if entry.key == "location"))
    for location in locations:
        relative = Path(location)
        if relative.is_absolute() or ".." in relative.parts:
            raise CqilError(f"'{path}': external data location '{location}' is not inside the ONNX folder; "
                            "export it again with `cqil export`")
        if not (path.parent / relative).is_file():
            raise CqilError(f"'{path}': its external data file '{path.parent / relative}' is missing: "
                            "copy the whole export directory")
    return tuple(sorted(locations))


def _all_tensors(graph) -> Iterator:
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _all_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_tensors(subgraph)


# -- config.pbtxt --------------------------------------------------------------------------------------

def config_text(name: str, kind: str, io: GraphIO) -> str:
    """The config.pbtxt of one model of the repository; `kind` is onnx, trt, python or text."""
    if kind == "text":
        return text_config_text(name, io)
    header = {
        "onnx": ['backend: "onnxruntime"', 'default_model_filename: "model.onnx"'],
        "trt": ['platform: "tensorrt_plan"', 'default_model_filename: "model.plan"'],
        "python": ['backend: "python"'],
    }[kind]
    lines = [f'name: "{name}"', *header, "max_batch_size: 0"]
    lines += _tensors_text("input", io.inputs) + _tensors_text("output", io.outputs)
    if kind == "trt":
        profiles = ", ".join(f'"{p}"' for p in ENGINE_PROFILES)
        lines.append(f"instance_group [ {{ kind: KIND_GPU count: 1 profile: [ {profiles} ] }} ]")
    elif kind == "python":
        lines.append("instance_group [ { kind: KIND_CPU count: 1 } ]")
    # The ONNX Runtime model keeps Triton's default placement: the GPU where there is one, else the CPU.
    lines += _plan_parameter(io)
    return "\n".join(lines) + "\n"


def text_config_text(name: str, io: GraphIO) -> str:
    """The text model: decoupled (it streams), the generate extension's tensors, in-flight batching limits."""
    entries = [f'  {{ name: "{tensor}" data_type: {dtype} dims: [ {dim} ]{" optional: true" if optional else ""} }}'
               for tensor, dtype, dim, optional in TEXT_INPUTS]
    outputs = [f'  {{ name: "{tensor}" data_type: {dtype} dims: [ -1 ] }}' for tensor, dtype in TEXT_OUTPUTS]
    lines = [f'name: "{name}"', 'backend: "python"', "max_batch_size: 0",
             "model_transaction_policy { decoupled: true }",
             "input [", ",\n".join(entries), "]",
             "output [", ",\n".join(outputs), "]",
             "instance_group [ { kind: KIND_CPU count: 1 } ]",
             *(f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}'
               for key, value in TEXT_PARAMETERS.items()),
             *_plan_parameter(io)]
    return "\n".join(lines) + "\n"


def _plan_parameter(io: GraphIO) -> list[str]:
    if io.spec.plan is None:
        return []
    plan = json.dumps(io.spec.plan.to_dict(), sort_keys=True, ensure_ascii=False)
    return [f'parameters {{ key: "{PLAN_KEY}" value {{ string_value: "{_quote(plan)}" }} }}']


def _tensors_text(field: str, tensors: tuple[TensorSpec, ...]) -> list[str]:
    entries = [f'  {{ name: "{t.name}" data_type: {t.data_type} dims: [ {", ".join(map(str, t.dims))} ] }}'
               for t in tensors]
    return [f"{field} [", ",\n".join(entries), "]"]


def _quote(text: str) -> str:
    """Escape for a protobuf text-format string literal."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# -- the repository ------------------------------------------------------------------------------------

def write_model_repository(onnx: Path, repo_dir: Path, model_name: str = "cqil",
                           engine_plan: Path | None = None) -> Repository:
    """Write the repository at `repo_dir` (replacing an earlier one) in one step: all of it or nothing."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", model_name):
        raise CqilError(f"model name '{model_name}' is not a plain folder name: use letters, digits, _ . -")
    io = read_graph_io(Path(onnx))
    if engine_plan is not None and not (Path(engine_plan).is_file() and Path(engine_plan).stat().st_size):
        raise CqilError(f"--engine '{engine_plan}' is not a TensorRT engine file: build it with `cqil engine`")
    if io.target != "portable" and has_tokenizer(io.onnx.parent):
        raise CqilError(f"'{io.onnx}' is a --target {io.target} export, whose attention reads a cache padded on the "
                        "right, and the text model batches rows padded on the left: give `cqil triton` a "
                        "--target portable export")
    repo_dir = Path(repo_dir)
    names = model_names(model_name)
    _refuse_foreign(repo_dir, names)
    models = {names["onnx"]: "ONNX Runtime backend", names["python"]: "Python backend, ONNX Runtime on CPU"}
    with atomic_dir(repo_dir, is_ours=lambda folder: True) as tmp:  # _refuse_foreign checked it
        onnx_version = tmp / names["onnx"] / VERSION
        link_or_copy(io.onnx, onnx_version / "model.onnx")
        for location in io.external_data:
            link_or_copy(io.onnx.parent / location, onnx_version / location)

        python_version = tmp / names["python"] / VERSION
        for relative in ("model.onnx", *io.external_data):
            link_or_copy(onnx_version / relative, python_version / relative)
        shutil.copyfile(PYTHON_MODEL_SOURCE, python_version / "model.py")

        if has_tokenizer(io.onnx.parent):
            text_version = tmp / names["text"] / VERSION
            text_version.mkdir(parents=True)
            for relative in io.external_data:
                link_or_copy(onnx_version / relative, text_version / relative)
            # The same weights; the graph returns the last position's logits only (export/last_logits.py).
            graph = keep_last_position_logits(onnx_lib.load(str(io.onnx), load_external_data=False))
            onnx_lib.save_model(graph, str(text_version / "model.onnx"))
            for side in TEXT_SIDE_FILES:
                if (io.onnx.parent / side).is_file():
                    shutil.copyfile(io.onnx.parent / side, text_version / side)
            # model.py with the contract's names written in (export/standalone.py), so it runs without cqil
            (text_version / "model.py").write_text(inline_contract(TEXT_MODEL_SOURCE.read_text()))
            shutil.copyfile(TEXT_SCHEDULER_SOURCE, text_version / TEXT_SCHEDULER_SOURCE.name)
            models[names["text"]] = "Python backend, text in / text out (generate extension)"

        if engine_plan is not None:
            link_or_copy(Path(engine_plan), tmp / names["trt"] / VERSION / "model.plan")
            models[names["trt"]] = "TensorRT engine"
        for kind, name in names.items():
            if name in models:
                (tmp / name / "config.pbtxt").write_text(config_text(name, kind, io))
    return Repository(repo_dir, dict(sorted(models.items())), io)


def _refuse_foreign(repo_dir: Path, names: dict[str, str]) -> None:
    """The repository is replaced as a whole, so never replace a folder holding anything else."""
    if not repo_dir.exists():
        return
    if not repo_dir.is_dir():
        raise CqilError(f"--out '{repo_dir}' is a file: give a directory for the model repository")
    foreign = sorted(p.name for p in repo_dir.iterdir() if p.name not in names.values())
    if foreign:
        raise CqilError(f"--out '{repo_dir}' holds other files ({', '.join(foreign[:3])}): "
                        "give an empty or new directory, it is replaced as a whole")



