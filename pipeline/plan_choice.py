"""Which plan a command uses: one function for every command line option and for `cqil build`.

The sources of a plan are exclusive: a plan file (--plan, or --official for the official CQIL config
form), a uniform S:E:P spec, explicit groups, the automatic search, or --original (every layer alone).
With none, a merged CQIL checkpoint's own plan applies, then a command's fallback (e.g. the plan an
adapter was trained for), else the command refuses to guess.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cqil.model import plan as plans
from cqil.model.errors import CqilError
from cqil.model.settings import NON_NEGATIVE, TEXT, setting
from cqil.pipeline.adapters import adapter_plan, check_adapter_plan
from cqil.pipeline.commands.options import JSON_FILE
from cqil.pipeline.sources import check_model_dir, load_model, resolve_model_dir

SOURCES = ("plan", "uniform", "groups", "official", "auto", "original")


@dataclass(frozen=True)
class PlanChoice:
    """The plan options as given (None / False: not given); their flags come from these fields."""

    plan: Path | None = setting(None, "plan.json, or an official CQIL config with cqil_layers", check=JSON_FILE,
                                toml=False)
    uniform: str | None = setting(None, "groups of P layers in [S, E), as in the paper", check=TEXT,
                                  metavar="S:E:P", toml=False)
    groups: str | None = setting(None, "explicit parallel groups, e.g. 15-16,17-18", check=TEXT, metavar="A-B,...",
                                 toml=False)
    official: Path | None = setting(None, "official CQIL config (JSON with cqil_layers and d)", check=JSON_FILE,
                                    toml=False)
    bypass: int | None = setting(None, "bypass distance d (default 0; with --plan, the plan's own)",
                                 check=NON_NEGATIVE, metavar="D", toml=False)
    auto: bool = False
    original: bool = False
    offers_original: bool = False  # the command has --original (named in the "no plan" message)

    @classmethod
    def from_args(cls, args: Any) -> PlanChoice:
        """From an argparse namespace; options a command does not have count as not given."""
        values = {name: getattr(args, name, None) for name in ("plan", "uniform", "groups", "official", "bypass")}
        return cls(**values, auto=bool(getattr(args, "auto", False)), original=bool(getattr(args, "original", False)),
                   offers_original=hasattr(args, "original"))

    def given(self) -> list[str]:
        return [name for name in SOURCES if getattr(self, name)]

    def check(self) -> str | None:
        """Refuse options that exclude each other (before any model is loaded); the one source given."""
        given = self.given()
        if len(given) > 1:
            for alone, does in (("auto", "searches the plan itself"), ("original", "exports the model without a plan")):
                if alone in given:
                    others = ", ".join(f"--{g}" for g in given if g != alone)
                    raise CqilError(f"--{alone} {does}: drop {others}")
            raise CqilError(f"give only one plan source (got {', '.join('--' + g for g in given)})")
        source = given[0] if given else None
        if self.bypass is not None and source in ("auto", "original", None):
            why = {"auto": "--auto tries the distances in --bypass-choices",
                   "original": "--original has no groups to bypass",
                   None: "--bypass sets the distance of a plan given with --plan, --uniform or --groups"}[source]
            raise CqilError(f"{why}: drop --bypass")
        return source


def resolve_plan(choice: PlanChoice, config: Any, search: Callable[[], plans.Plan] | None = None,
                 fallback: Callable[[], plans.Plan | None] | None = None,
                 required: bool = True) -> plans.Plan | None:
    """The plan `choice` names for the model of `config`, checked to fit it.

    `search` runs the automatic search (--auto); `fallback` is asked when no option and no checkpoint
    plan is given. Returns None only when nothing names a plan and `required` is False.
    """
    source = choice.check()
    layers = config.num_hidden_layers
    record = plans.model_record(config)
    if source == "original":
        plan = plans.identity_plan(layers, record)
    elif source == "auto":
        if search is None:
            raise CqilError("--auto is only available to `cqil plan` and `cqil build`")
        plan = search()
    elif source in ("plan", "official"):
        loaded = plans.load_plan(getattr(choice, source), layers)
        bypass = loaded.bypass if choice.bypass is None else choice.bypass
        plan = plans.Plan(loaded.groups, bypass, loaded.model or record, loaded.dropped, loaded.latency)
    elif source == "uniform":
        plan = plans.parse_uniform_spec(choice.uniform, layers, choice.bypass or 0, record)
    elif source == "groups":
        plan = plans.parse_groups_spec(choice.groups, layers, choice.bypass or 0, record)
    else:
        plan = plans.plan_from_config(config) or (fallback() if fallback else None)
        if plan is None:
            if not required:
                return None
            original = ", or --original to export the original model" if choice.offers_original else ""
            raise CqilError("no plan: pass --plan plan.json, --uniform S:E:P or --groups A-B,... "
                            f"(or a merged CQIL checkpoint as --model){original}")
    plan.check_fits(config)
    return plan


def adapter_fallback(adapter: Path | None, config: Any) -> Callable[[], plans.Plan | None]:
    """The plan an adapter of ours was trained for, as a `resolve_plan` fallback."""
    def plan() -> plans.Plan | None:
        if adapter is None:
            return None
        try:
            found = adapter_plan(adapter, config.num_hidden_layers)
            if found is not None:
                found.check_fits(config)
            return found
        except CqilError as exc:
            raise CqilError(f"adapter '{adapter}' was trained for another model ({exc})") from exc
    return plan


def load_model_and_plan(args: Any, *, adapter: Path | None = None, strict: bool = False, required: bool = True,
                        dtype: str | None = None):
    """A command's prologue: check its plan options, load --model, resolve the plan against it.

    (loaded model, plan); the plan is None only when nothing names one and `required` is False. `adapter`:
    the plan an adapter of ours was trained for is the fallback (`cqil eval`, `cqil merge`), and an adapter
    trained for another plan is warned about (refused when `strict`).
    """
    choice = PlanChoice.from_args(args)
    choice.check()  # before the model loads
    loaded = load_model(args.model, **({"dtype": dtype} if dtype else {}))
    config = loaded.model.config
    fallback = adapter_fallback(adapter, config) if adapter is not None else None
    plan = resolve_plan(choice, config, fallback=fallback, required=required)
    if adapter is not None:
        check_adapter_plan(adapter, plan, strict)
    return loaded, plan


def config_and_plan(args: Any, search: Callable[[], plans.Plan] | None = None):
    """The prologue of commands that need the model's config only (`cqil plan`, `--ranks`): (model dir, plan)."""
    from transformers import AutoConfig

    choice = PlanChoice.from_args(args)
    choice.check()
    path = resolve_model_dir(args.model)
    check_model_dir(path)
    return path, resolve_plan(choice, AutoConfig.from_pretrained(path), search=search)
