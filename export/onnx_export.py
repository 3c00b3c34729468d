"""torch.export -> ONNX for a layout module, then the optimizer passes that keep branches apart.

The exporter's default optimization ends with common-subexpression elimination, which merges the
RMSNorm statistics that the p branches of a group compute from the same input: the branches would no
longer be separate. So we export with `optimize=False` and run onnxscript's own pass list without
CSE. Names come last (`export.naming`), after passes that may add or remove nodes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator

import torch
from cqil.export import contract
from cqil.export.naming import label_nodes
from cqil.model.cqil import CqilModel
from torch import nn

OPSET = 18
# torch.onnx logs "torchvision is not installed. Skipping torchvision::nms" (and three more ops) each
# time it builds its op registry; our graphs have no torchvision ops. Only those records are dropped.
REGISTRY_LOGGER = "torch.onnx._internal.exporter._registration"


class _NoTorchvisionNotes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("torchvision is not installed")


@contextlib.contextmanager
def no_torchvision_notes() -> Iterator[None]:
    """Drop torch.onnx's "torchvision is not installed" records while exporting; every other record passes.

    A filter on the registry's own logger, not a level: torch resets its loggers' levels when its
    logging initializes, and a level would hide real warnings too.
    """
    logger, note_filter = logging.getLogger(REGISTRY_LOGGER), _NoTorchvisionNotes()
    logger.addFilter(note_filter)
    try:
        yield
    finally:
        logger.removeFilter(note_filter)


def optimize_without_cse(model) -> None:
    """onnxscript's `optimize_ir` pass list, minus CommonSubexpressionEliminationPass (in place)."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript import rewriter
    from onnxscript.optimizer import _constant_folding

    passes = ir.passes.Sequential(
        common.InlinePass(),
        ir.passes.PassManager(
            [
                _constant_folding.FoldConstantsPass(
                    shape_inference=True,
                    input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                    output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                ),
                rewriter.RewritePass(rewriter._DEFAULT_REWRITE_RULES),
                common.RemoveUnusedNodesPass(),
                common.RemoveUnusedFunctionsPass(),
                common.RemoveUnusedOpsetsPass(),
            ],
            steps=2,
            early_stop=True,
        ),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )
    passes(model)


def export_layout(module: nn.Module, model: CqilModel, dtype: torch.dtype, verbose: bool = False):
    """Trace `module` (a ContractModule) and return the optimized, labelled onnx_ir model."""
    layers = model.num_layers
    args = contract.example_inputs(model, dtype)
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with torch.no_grad(), quiet, warnings.catch_warnings(), no_torchvision_notes():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(), args, dynamo=True, optimize=False, opset_version=OPSET,
            dynamic_shapes=contract.dynamic_shapes(layers),
            input_names=contract.input_names(layers), output_names=contract.output_names(layers),
            verbose=verbose, report=False,
        )
    ir_model = program.model
    optimize_without_cse(ir_model)
    label_nodes(ir_model.graph, model.plan)
    return ir_model
