"""Cross-modal retrieval metrics and the per-epoch validation of a contrastive model.

>>> import torch
>>> x = torch.eye(4)
>>> retrieval_metrics(x, x, ks=(1,))
{'a2b_R@1': 1.0, 'b2a_R@1': 1.0}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, default_collate

from ehrclip_kit.models import ContrastiveModel, local_losses, unwrap
from ehrclip_kit.training import move_to_device


def _ranks(queries: torch.Tensor, keys: torch.Tensor, chunk: int) -> torch.Tensor:
    """Rank (0 = best) of each query's own key ``keys[i]`` among all keys, counting ties against it."""
    out = []
    for start in range(0, queries.shape[0], chunk):
        sims = queries[start : start + chunk] @ keys.T
        idx = torch.arange(sims.shape[0], device=sims.device)
        own = sims[idx, idx + start]
        # Pessimistic ties: a collapsed model (all embeddings equal) must score 0, not a perfect 1.
        out.append((sims >= own[:, None]).sum(dim=1) - 1)
    return torch.cat(out)


def retrieval_metrics(
    a_emb: torch.Tensor | np.ndarray,
    b_emb: torch.Tensor | np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    names: tuple[str, str] = ("a", "b"),
    chunk: int = 4096,
) -> dict[str, float]:
    """Recall@k of paired retrieval: row i of ``a_emb`` belongs with row i of ``b_emb``.

    Similarity is cosine (both sides are L2-normalised here). ``"a2b_R@k"`` is the fraction of ``a`` rows
    whose partner is among the k most similar ``b`` rows; ``"b2a_R@k"`` the reverse. ``names`` renames
    ``a``/``b`` in the keys (e.g. ``("ehr", "text")`` -> ``"ehr2text_R@1"``). Ties count against the pair.
    """
    a = torch.as_tensor(np.asarray(a_emb) if not isinstance(a_emb, torch.Tensor) else a_emb).float()
    b = torch.as_tensor(np.asarray(b_emb) if not isinstance(b_emb, torch.Tensor) else b_emb).float()
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"retrieval_metrics needs two (n, d) arrays of equal shape, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    if a.shape[0] == 0:
        raise ValueError("retrieval_metrics needs at least one pair")
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    na, nb = names
    out: dict[str, float] = {}
    for direction, ranks in ((f"{na}2{nb}", _ranks(a, b, chunk)), (f"{nb}2{na}", _ranks(b, a, chunk))):
        for k in ks:
            out[f"{direction}_R@{k}"] = float((ranks < k).float().mean())
    return out


def _root(model: ContrastiveModel, name: str) -> str:
    while name in model.head_sources:
        name = model.head_sources[name]
    return name


class ContrastiveEvaluator:
    """Validation for the Trainer's ``evaluate=``: mean contrastive loss and recall@k per space.

    Returns ``{"val/loss", "val/<space>/contrastive_loss", "val/<space>/<a>2<b>_R@k", ...}`` where ``<a>``,
    ``<b>`` are the encoders at the roots of the space's two sides (``ehr2text_R@1``, ``ecg2codes_R@5``).
    The loss is averaged over batches of ``batch_size`` (it depends on the number of negatives, so keep
    it equal to the training batch size to compare); recall is over the whole dataset at once.
    """

    def __init__(
        self,
        dataset: Dataset,
        collate_fn: Callable | None = None,
        batch_size: int = 64,
        ks: Sequence[int] = (1, 5, 10),
        prefix: str = "val/",
    ):
        self.dataset, self.collate_fn, self.batch_size = dataset, collate_fn or default_collate, batch_size
        self.ks, self.prefix = tuple(ks), prefix

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        model = unwrap(model)
        if not isinstance(model, ContrastiveModel):
            raise TypeError(f"ContrastiveEvaluator needs a ContrastiveModel, got {type(model).__name__}")
        device = next(model.parameters()).device
        # An explicit generator: creating a DataLoader iterator must not draw from the global RNG
        # (that would break bit-exact resume of the training run around it).
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=self.collate_fn,
            generator=torch.Generator().manual_seed(0),
        )
        names = sorted({n for s in model.spaces for n in (s.a, s.b)})
        sums: dict[str, float] = {}
        rows = 0
        embs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        was_training = model.training
        model.eval()
        try:
            with local_losses(model):
                for batch in loader:
                    batch = move_to_device(batch, device)
                    emb = model.embed(batch, names)
                    out = model.space_losses(emb)
                    n = next(iter(emb.values())).shape[0]
                    rows += n
                    for key, value in out.items():
                        if key == "loss" or key.endswith("/contrastive_loss"):
                            sums[key] = sums.get(key, 0.0) + float(value) * n
                    for name in names:
                        embs[name].append(emb[name].float().cpu())
        finally:
            model.train(was_training)
        if rows == 0:
            raise ValueError("ContrastiveEvaluator: the validation dataset is empty")
        metrics = {f"{self.prefix}{k}": v / rows for k, v in sums.items()}
        for s in model.spaces:
            a, b = torch.cat(embs[s.a]), torch.cat(embs[s.b])
            found = retrieval_metrics(a, b, self.ks, names=(_root(model, s.a), _root(model, s.b)))
            metrics.update({f"{self.prefix}{s.name}/{k}": v for k, v in found.items()})
        return metrics
