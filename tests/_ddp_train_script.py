"""Toy contrastive training under torchrun (used by tests/test_training.py).

    python -m torch.distributed.run --nproc_per_node 2 --standalone tests/_ddp_train_script.py --out DIR

Rank 0 writes ``DIR/checkpoint`` and ``DIR/result.json`` (history and per-step losses). ``run(...)`` with one
process and ``batch_size * world_size`` reproduces the same global batches.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

PER_RANK_BATCH = 8


def toy_dataset(n: int = 64, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """EHR and text vectors that are two noisy views of one latent."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, generator=g)
    ehr = z @ torch.randn(3, 6, generator=g) + 0.1 * torch.randn(n, 6, generator=g)
    text = z @ torch.randn(3, 5, generator=g) + 0.1 * torch.randn(n, 5, generator=g)
    return [{"ehr": ehr[i], "text": text[i]} for i in range(n)]


def toy_model():
    from ehrclip_kit.losses import ClipLoss
    from ehrclip_kit.models import ehr_text_model

    torch.manual_seed(0)
    # No dropout: ranks draw different dropout masks, which one process cannot reproduce.
    encoder = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8))
    return ehr_text_model(encoder, d_ehr=8, d_text=5, proj_dim=4, dropout=0.0, loss=ClipLoss(local_loss=True))


def run(out_dir, batch_size: int, dist=None) -> dict:
    from ehrclip_kit.training import TrainConfig, Trainer

    cfg = TrainConfig(
        epochs=2,
        lr=5e-3,
        batch_size=batch_size,
        grad_accum=1,
        warmup_steps=2,
        checkpoint_every=3,
        log_every=1,
        progress=False,
        seed=3,
    )
    trainer = Trainer(toy_model(), toy_dataset(), cfg, out_dir=out_dir, dist=dist, model_config={"toy": True})
    history = trainer.fit(resume=False)
    return {"history": history, "step_losses": [s["loss"] for s in trainer.step_log]}


def main() -> int:
    from ehrclip_kit.distributed import cleanup, init_distributed

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = init_distributed(device="cpu")
    try:
        result = run(args.out, PER_RANK_BATCH, dist=info)
        result["world_size"] = info.world_size
        if info.is_main:
            Path(args.out, "result.json").write_text(json.dumps(result))
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
