"""One contrastive model for every pairing: encoders + projection heads + spaces.

* **encoders** ``{modality: nn.Module}``, each called as ``encoder(batch[modality]) -> (B, d)``.
* **heads** ``{name: HeadSpec(source, module)}``; ``source`` is an encoder name *or another head's name*,
  so heads can be chained (Fine-and-Coarse: ``ecg -> ecg_fine -> ecg_coarse``).
* **spaces** ``[SpaceSpec(name, a, b, loss, weight)]``: which two embeddings meet under which loss. The total
  loss is the weighted sum of one contrastive term per space; each space has its own learnable temperature.

The EHR-note model of arXiv 2505.17643 is one space (:func:`ehr_text_model`); the ECG model of Lalam et
al. is two (:func:`fac_model`): ECG and codes meet in a fine space, the ECG's fine embedding is projected on
into a coarse space where the text meets it.

>>> import torch
>>> from torch import nn
>>> model = pair_model(nn.Identity(), nn.Identity(), names=("ecg", "codes"), dims=(6, 4), proj_dim=8)
>>> out = model({"ecg": torch.randn(5, 6), "codes": torch.randn(5, 4)})
>>> sorted(out)
['ecg_codes/contrastive_loss', 'ecg_codes/logit_scale', 'loss']
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ehrclip_kit.checkpointing import submodule_state, unwrap
from ehrclip_kit.encoders.projection import ProjectionHead
from ehrclip_kit.losses import make_loss


@dataclass
class HeadSpec:
    """A projection head reading the output of ``source`` (an encoder or another head)."""

    source: str
    module: nn.Module


@dataclass
class SpaceSpec:
    """Embeddings ``a`` and ``b`` (encoder or head names) meet in space ``name`` under ``loss``.

    ``loss`` is a loss module or a name (``"clip"``, ``"siglip"``). ``init_logit_scale`` overrides the
    model-wide initial temperature for this space (SigLIP losses bring their own default, log 10).
    """

    name: str
    a: str
    b: str
    loss: nn.Module | str = "clip"
    weight: float = 1.0
    init_logit_scale: float | None = None


class ContrastiveModel(nn.Module):
    """Encoders, projection heads and contrastive spaces; ``model(batch)`` returns the losses.

    ``forward(batch)`` returns ``{"loss": Σ weight·term, "<space>/contrastive_loss": term,
    "<space>/logit_scale": exp(scale)}``. Call :meth:`clamp_logit_scales` after every optimiser step (the
    Trainer does).
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        heads: Mapping[str, HeadSpec],
        spaces: Iterable[SpaceSpec],
        init_logit_scale: float = math.log(1 / 0.07),
        max_logit_scale: float = math.log(100),
    ):
        super().__init__()
        heads = {k: h if isinstance(h, HeadSpec) else HeadSpec(*h) for k, h in heads.items()}
        spaces = list(spaces)
        for name in [*encoders, *heads, *(s.name for s in spaces)]:
            if not name or "." in name:
                raise ValueError(f"name {name!r} must be non-empty and contain no '.'")
        clash = sorted(set(encoders) & set(heads))
        if clash:
            raise ValueError(f"names used both as encoder and head: {clash}")
        self.encoders = nn.ModuleDict(dict(encoders))
        self.heads = nn.ModuleDict({k: h.module for k, h in heads.items()})
        self.head_sources = {k: h.source for k, h in heads.items()}
        self._head_order = _dependency_order(self.head_sources, set(encoders))
        self.max_logit_scale = float(max_logit_scale)
        self.init_logit_scale = float(init_logit_scale)

        names = set(encoders) | set(heads)
        if not spaces:
            raise ValueError("a ContrastiveModel needs at least one space")
        if len({s.name for s in spaces}) != len(spaces):
            raise ValueError(f"space names must be unique: {[s.name for s in spaces]}")
        self.spaces = spaces
        self.losses = nn.ModuleDict()
        self.logit_scales = nn.ParameterDict()
        self.logit_biases = nn.ParameterDict()
        for s in spaces:
            for side in (s.a, s.b):
                if side not in names:
                    raise ValueError(
                        f"space {s.name!r} uses unknown embedding {side!r}; known: {sorted(names)}"
                    )
            loss = make_loss(s.loss) if isinstance(s.loss, str) else s.loss
            self.losses[s.name] = loss
            init = s.init_logit_scale
            if init is None:
                init = getattr(loss, "init_logit_scale", init_logit_scale)
            self.logit_scales[s.name] = nn.Parameter(torch.tensor(float(init)))
            if getattr(loss, "uses_bias", False):
                self.logit_biases[s.name] = nn.Parameter(torch.tensor(float(loss.init_logit_bias)))

    # ----------------------------------------------------------------------------------------- embedding
    def _needed(self, targets: Iterable[str]) -> set[str]:
        needed: set[str] = set()
        for target in targets:
            name = target
            if name not in self.encoders and name not in self.heads:
                known = sorted([*self.encoders, *self.heads])
                raise KeyError(f"unknown embedding {name!r}; known: {known}")
            while name in self.head_sources:
                needed.add(name)
                name = self.head_sources[name]
            needed.add(name)
        return needed

    def embed(
        self, batch: Mapping[str, Any], names: str | Iterable[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Compute the embeddings ``names`` (default: those the spaces use), and only what they need.

        The result holds encoder outputs under the encoder name and head outputs under the head name,
        including intermediate ones computed on the way (e.g. ``"ecg"`` and ``"ecg_fine"`` for
        ``"ecg_coarse"``). ``batch`` needs an entry for each encoder that is actually run.
        """
        if names is None:
            names = [n for s in self.spaces for n in (s.a, s.b)]
        elif isinstance(names, str):
            names = [names]
        needed = self._needed(names)
        out: dict[str, torch.Tensor] = {}
        for name, encoder in self.encoders.items():
            if name in needed:
                if name not in batch:
                    raise KeyError(
                        f"batch has no entry {name!r} (needed for {sorted(names)}); batch keys: {sorted(batch)}"
                    )
                out[name] = encoder(batch[name])
        for name in self._head_order:
            if name in needed:
                out[name] = self.heads[name](out[self.head_sources[name]])
        return out

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return self.space_losses(self.embed(batch))

    def space_losses(self, emb: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The losses of :meth:`forward` from embeddings already computed by :meth:`embed`."""
        result: dict[str, torch.Tensor] = {}
        total = None
        for s in self.spaces:
            scale = self.logit_scales[s.name].exp()
            bias = self.logit_biases[s.name] if s.name in self.logit_biases else None
            terms = self.losses[s.name](emb[s.a], emb[s.b], scale, bias)
            for key, value in terms.items():
                result[f"{s.name}/{key}"] = value
            result[f"{s.name}/logit_scale"] = scale.detach()
            term = s.weight * terms["contrastive_loss"]
            total = term if total is None else total + term
        result["loss"] = total
        return result

    # ------------------------------------------------------------------------------- training plumbing
    @torch.no_grad()
    def clamp_logit_scales(self) -> None:
        """Keep every temperature in [0, max_logit_scale] (log space), as CLIP does after each step."""
        for p in self.logit_scales.values():
            p.clamp_(0.0, self.max_logit_scale)

    def configure_distributed(
        self, rank: int, world_size: int, local_loss: bool | None = None, gather_with_grad: bool | None = None
    ) -> None:
        """Tell every space's loss where this process sits, so it gathers the other ranks' embeddings."""
        for loss in self.losses.values():
            loss.rank, loss.world_size = rank, world_size
            if local_loss is not None and hasattr(loss, "local_loss"):
                loss.local_loss = local_loss
            if gather_with_grad is not None and hasattr(loss, "gather_with_grad"):
                loss.gather_with_grad = gather_with_grad

    def structure(self) -> dict[str, Any]:
        """A JSON-ready description of the wiring (saved in the checkpoint's config.json)."""
        return {
            "encoders": {k: type(m).__name__ for k, m in self.encoders.items()},
            "heads": {
                k: {"source": self.head_sources[k], "class": type(self.heads[k]).__name__}
                for k in self._head_order
            },
            "spaces": [
                {
                    "name": s.name,
                    "a": s.a,
                    "b": s.b,
                    "loss": type(self.losses[s.name]).__name__,
                    "weight": s.weight,
                }
                for s in self.spaces
            ],
            "max_logit_scale": self.max_logit_scale,
        }


def _dependency_order(sources: Mapping[str, str], encoders: set[str]) -> list[str]:
    """Heads ordered so that each comes after its source; clear errors for unknown sources and cycles."""
    order: list[str] = []
    state: dict[str, str] = {}  # "visiting" while on the DFS path, "done" after

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = path[path.index(name) :] + [name]
            raise ValueError(f"projection heads form a cycle: {' -> '.join(cycle)}")
        state[name] = "visiting"
        src = sources[name]
        if src in sources:
            visit(src, path + [name])
        elif src not in encoders:
            raise ValueError(
                f"head {name!r} reads unknown source {src!r}; encoders: {sorted(encoders)}, heads: {sorted(sources)}"
            )
        state[name] = "done"
        order.append(name)

    for name in sources:
        visit(name, [])
    return order


@contextlib.contextmanager
def local_losses(model: nn.Module) -> Iterator[None]:
    """Temporarily compute every space's loss on this process's batch only (no all-gather).

    For evaluation on one rank of a distributed run, where a gathering loss would wait forever.
    """
    model = unwrap(model)
    losses = list(getattr(model, "losses", {}).values()) if isinstance(model, ContrastiveModel) else []
    saved = [(loss.rank, loss.world_size) for loss in losses]
    try:
        for loss in losses:
            loss.rank, loss.world_size = 0, 1
        yield
    finally:
        for loss, (rank, world_size) in zip(losses, saved, strict=True):
            loss.rank, loss.world_size = rank, world_size


# --------------------------------------------------------------------------------------------- factories
def _head(d_in: int, d_out: int, hidden: int | None, dropout: float) -> ProjectionHead:
    return ProjectionHead(d_in, d_out, hidden=hidden, dropout=dropout)


def ehr_text_model(
    ehr_encoder: nn.Module,
    d_ehr: int,
    d_text: int,
    text_encoder: nn.Module | None = None,
    proj_dim: int = 128,
    loss: str | nn.Module = "clip",
    hidden: int | None = None,
    dropout: float = 0.1,
    **model_kwargs,
) -> ContrastiveModel:
    """EHR <-> discharge note (arXiv 2505.17643): space ``"ehr_text"`` between heads ``ehr_proj`` and ``text_proj``.

    Batch keys ``"ehr"`` and ``"text"``. With ``text_encoder=None`` the text side is the identity, so
    ``batch["text"]`` holds cached note embeddings (B, d_text) (the text-embedding cache mode).
    """
    return ContrastiveModel(
        encoders={"ehr": ehr_encoder, "text": text_encoder if text_encoder is not None else nn.Identity()},
        heads={
            "ehr_proj": HeadSpec("ehr", _head(d_ehr, proj_dim, hidden, dropout)),
            "text_proj": HeadSpec("text", _head(d_text, proj_dim, hidden, dropout)),
        },
        spaces=[SpaceSpec("ehr_text", "ehr_proj", "text_proj", loss)],
        **model_kwargs,
    )


def pair_model(
    enc_a: nn.Module,
    enc_b: nn.Module,
    names: tuple[str, str] = ("ecg", "codes"),
    dims: tuple[int, int] = (128, 128),
    proj_dim: int = 128,
    loss: str | nn.Module = "clip",
    hidden: int | None = None,
    dropout: float = 0.1,
    **model_kwargs,
) -> ContrastiveModel:
    """Two modalities, one space (ECG-codes, ECG-text, ...): space ``"<a>_<b>"``, heads ``"<a>_proj"``, ``"<b>_proj"``."""
    a, b = names
    return ContrastiveModel(
        encoders={a: enc_a, b: enc_b},
        heads={
            f"{a}_proj": HeadSpec(a, _head(dims[0], proj_dim, hidden, dropout)),
            f"{b}_proj": HeadSpec(b, _head(dims[1], proj_dim, hidden, dropout)),
        },
        spaces=[SpaceSpec(f"{a}_{b}", f"{a}_proj", f"{b}_proj", loss)],
        **model_kwargs,
    )


def fac_model(
    ecg_encoder: nn.Module,
    codes_encoder: nn.Module,
    text_encoder: nn.Module | None,
    d_ecg: int,
    d_codes: int,
    d_text: int,
    fine_dim: int = 128,
    coarse_dim: int = 128,
    loss: str | nn.Module = "clip",
    weights: tuple[float, float] = (1.0, 1.0),
    hidden: int | None = None,
    dropout: float = 0.1,
    **model_kwargs,
) -> ContrastiveModel:
    """Fine-and-Coarse ECG <-> codes <-> text (Lalam et al., TMLR 2023).

    Heads: ``ecg_fine`` (from ``ecg``) and ``codes_fine`` meet in space ``"fine"``; ``ecg_coarse`` (from
    ``ecg_fine``) and ``text_coarse`` meet in space ``"coarse"``. ``text_encoder=None``: cached text vectors.
    A loss given as a module is shared by both spaces (losses hold no state).
    """
    return ContrastiveModel(
        encoders={
            "ecg": ecg_encoder,
            "codes": codes_encoder,
            "text": text_encoder if text_encoder is not None else nn.Identity(),
        },
        heads={
            "ecg_fine": HeadSpec("ecg", _head(d_ecg, fine_dim, hidden, dropout)),
            "codes_fine": HeadSpec("codes", _head(d_codes, fine_dim, hidden, dropout)),
            "ecg_coarse": HeadSpec("ecg_fine", _head(fine_dim, coarse_dim, hidden, dropout)),
            "text_coarse": HeadSpec("text", _head(d_text, coarse_dim, hidden, dropout)),
        },
        spaces=[
            SpaceSpec("fine", "ecg_fine", "codes_fine", loss, weights[0]),
            SpaceSpec("coarse", "ecg_coarse", "text_coarse", loss, weights[1]),
        ],
        **model_kwargs,
    )


def encoder_state(source, name: str) -> dict[str, torch.Tensor]:
    """One encoder's weights, ready for ``encoder.load_state_dict(...)`` (e.g. to fine-tune the EHR encoder).

    ``source``: a ContrastiveModel, its state dict, or a checkpoint folder / ``model.safetensors`` file.
    """
    return submodule_state(source, f"encoders.{name}.")


def head_state(source, name: str) -> dict[str, torch.Tensor]:
    """One projection head's weights (same sources as :func:`encoder_state`)."""
    return submodule_state(source, f"heads.{name}.")
