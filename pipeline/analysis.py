"""Layer-input similarity: how alike the inputs of the decoder layers are (the premise of CQIL)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from cqil.model.cqil import CqilModel
from tqdm import tqdm


@torch.no_grad()
def layer_input_similarity(model: CqilModel, chunks: torch.Tensor, batch_size: int = 4,
                           progress: bool = True) -> torch.Tensor:
    """[L, L] cosine similarity of layer inputs, averaged over every token of `chunks`.

    The input of layer i is the residual stream entering it under the model's plan (for the
    original model: the hidden state after layers 0..i-1).
    """
    inputs: list[torch.Tensor] = []
    hooks = [
        layer.input_layernorm.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
        for layer in model.layers
    ]
    total = torch.zeros(model.num_layers, model.num_layers, dtype=torch.float64)
    count = 0
    try:
        for batch in tqdm(torch.split(chunks, batch_size), desc="analyze", unit="batch",
                          disable=not progress, leave=False):
            inputs.clear()
            model(batch)
            stacked = F.normalize(torch.stack(inputs).flatten(1, 2).float(), dim=-1)  # [L, tokens, H]
            total += torch.einsum("ith,jth->ij", stacked, stacked).double()
            count += stacked.shape[1]
    finally:
        for hook in hooks:
            hook.remove()
    return (total / count).float()


def similarity_report(matrix: torch.Tensor, tokens: int, model_name: str) -> dict:
    """JSON-ready: adjacent similarities and the full matrix."""
    size = matrix.shape[0]
    return {
        "model": model_name,
        "tokens": tokens,
        "num_layers": size,
        "adjacent": [round(float(matrix[i, i + 1]), 6) for i in range(size - 1)],
        "all_pairs": [[round(float(v), 6) for v in row] for row in matrix],
    }


def save_heatmap(matrix: torch.Tensor, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.4), dpi=110)
    image = ax.imshow(matrix.numpy(), cmap="viridis", vmin=float(matrix.min()), vmax=1.0, origin="upper")
    ax.set_xlabel("layer j (input)")
    ax.set_ylabel("layer i (input)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="cosine similarity")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})  # no timestamp: same inputs, same bytes
    plt.close(fig)
