"""Pairs per second of our EHR <-> note contrastive step against the paper's straightforward recipe.

Measured in one run, on the same hardware, same random data, same model (issue 3, section 10):

* **paper** -- Hugging Face Longformer (full size: 12 layers, hidden 768, attention window 512, 4098
  positions; random weights, which do not change the cost), fp32, batch of 64 notes, the chunks of *one
  note at a time* through the model (each chunk padded to ``max_tokens``, then to the attention window as
  Longformer requires), global attention on each chunk's first token, the first 10 layers frozen the
  standard Hugging Face way (``requires_grad=False``; the whole model in ``train()`` mode).
* **ours** -- :class:`ehrclip_kit.encoders.text.TextEncoder`: the chunks of *all* notes of the batch in one
  padded tensor (padded to the batch's longest chunk, rounded up to the attention window), run through the
  model ``--chunk-batch`` chunks per call in groups of similar length (64 on a GPU; 1 on a CPU, where big
  batches are memory-bound), the frozen prefix builds no graph and runs without dropout, bf16 autocast on
  a GPU. With window 512 and 256-token chunks Longformer needs 512 positions either way, so padding is
  the same for both methods; the gains come from batching, precision and the frozen prefix.
* **cache** -- the text-embedding cache mode (all text layers frozen): every note embedded once, then
  training runs on the cached vectors (EHR tower + heads only). Reported as epoch-time ratios against
  end-to-end training with "ours".

Both sides are the kit's real model (:func:`ehrclip_kit.models.ehr_text_model`: TabNet EHR encoder over 105
random feature columns, projection heads, ClipLoss) trained by AdamW; only the text tower differs.

    python benchmarks/pretrain_throughput.py            # full size (meant for a GPU)
    python benchmarks/pretrain_throughput.py --quick    # a few minutes on a laptop CPU (2 layers, batch 8)

Note lengths (content tokens per note) are drawn from a log-normal around ``--median-tokens`` (MIMIC-IV
discharge summaries run to roughly 1,000-2,500 tokens after cleaning, i.e. ~4-10 chunks of 256).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ehrclip_kit.encoders.text import TextEncoder, collate_notes, embed_chunked_notes  # noqa: E402

N_EHR_COLUMNS = 105


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="CPU smoke size: 2 layers (1 frozen), batch 8, 2 steps"
    )
    p.add_argument("--layers", type=int, default=12, help="Longformer layers (paper: 12)")
    p.add_argument("--frozen", type=int, default=10, help="frozen first layers (paper: 10)")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--window", type=int, default=512, help="Longformer attention window")
    p.add_argument("--batch", type=int, default=64, help="notes (pairs) per step (paper: 64)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per chunk (paper: 256)")
    p.add_argument("--median-tokens", type=int, default=1500, help="median content tokens per note")
    p.add_argument("--notes", type=int, default=1024, help="notes embedded to time the cache mode")
    p.add_argument("--epochs", type=int, default=13, help="epochs for the cache-mode total (paper: 13)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-paper", action="store_true", help="measure only ours and the cache mode")
    p.add_argument(
        "--chunk-batch", type=int, help="ours: chunks per model call (default: 64 on GPU, 1 on CPU)"
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; --quick: 1)")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.frozen, args.batch, args.steps, args.warmup = 2, 1, 8, 2, 1
        args.median_tokens, args.notes = 300, 16
        # Several OpenMP threads thrash on a busy shared machine (a 30x slowdown on small ops measured here).
        args.threads = 1 if args.threads is None else args.threads
    if not 0 <= args.frozen <= args.layers:
        p.error(f"--frozen must be in [0, --layers={args.layers}]")
    return args


# ----------------------------------------------------------------------------------------------- models
def build_longformer(args: argparse.Namespace):
    from transformers import LongformerConfig, LongformerModel

    config = LongformerConfig(
        vocab_size=50265, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64), intermediate_size=4 * args.hidden,
        attention_window=args.window, max_position_embeddings=4098, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, type_vocab_size=1,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    return LongformerModel(config)


class OneNoteAtATime(nn.Module):
    """The paper's straightforward text tower: a loop over notes, each note's chunks in their own call."""

    def __init__(self, model: nn.Module, frozen: int):
        super().__init__()
        self.model = model
        self.model.requires_grad_(True)
        for module in [model.embeddings, *model.encoder.layer[:frozen]]:
            module.requires_grad_(False)
        if getattr(model, "pooler", None) is not None:
            model.pooler.requires_grad_(False)
        self.out_dim = model.config.hidden_size

    def forward(self, notes: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        vectors = []
        for note in notes:  # ids [n_chunks, max_tokens]; Longformer pads them to the window itself
            out = self.model(**note).last_hidden_state[:, 0]
            vectors.append(out.mean(0))
        return torch.stack(vectors)


def build_contrastive(text_encoder: nn.Module | None, d_text: int, device: torch.device, seed: int):
    """The kit's EHR <-> text model; a stand-in MLP if the TabNet encoder is not available."""
    from ehrclip_kit.models import ehr_text_model

    torch.manual_seed(seed)
    try:
        from ehrclip_kit.encoders.tabular import TabNetEhrEncoder

        ehr = TabNetEhrEncoder(N_EHR_COLUMNS, n_d=128, n_a=128, n_steps=3, virtual_batch_size=128)
    except ImportError:  # another engineer's module; keep the benchmark runnable without it
        ehr = nn.Sequential(nn.Linear(N_EHR_COLUMNS, 256), nn.ReLU(), nn.Linear(256, 128))
    return ehr_text_model(ehr, 128, d_text, text_encoder=text_encoder).to(device)


# ------------------------------------------------------------------------------------------------- data
def make_notes(n: int, args: argparse.Namespace, rng: np.random.Generator) -> list[list[list[int]]]:
    """Random token-id notes already cut into [<s>, ..., </s>] chunks of at most max_tokens."""
    window = args.max_tokens - 2
    lengths = np.clip(rng.lognormal(math.log(args.median_tokens), 0.6, size=n), 16, 16 * window).astype(int)
    notes = []
    for length in lengths:
        ids = rng.integers(3, 50265, size=int(length)).tolist()
        notes.append([[0, *ids[s : s + window], 2] for s in range(0, len(ids), window)])
    return notes


def paper_inputs(notes, max_tokens: int, device) -> list[dict[str, torch.Tensor]]:
    out = []
    for chunks in notes:
        batch = collate_notes([chunks], pad_id=1)
        pad = max_tokens - batch["input_ids"].shape[1]  # "padding='max_length'" as a tokenizer call would
        ids = nn.functional.pad(batch["input_ids"], (0, pad), value=1)
        mask = nn.functional.pad(batch["attention_mask"], (0, pad), value=0)
        global_mask = torch.zeros_like(mask)
        global_mask[:, 0] = 1
        out.append({k: v.to(device) for k, v in
                    dict(input_ids=ids, attention_mask=mask, global_attention_mask=global_mask).items()})  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------ timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(steps: dict[str, Callable[[int], None]], n_steps: int, warmup: int, device) -> dict[str, dict]:
    """Run the methods' steps *interleaved* (a, b, a, b, ...) so that a busy machine slows them alike.

    Returns per method the median wall seconds and process CPU seconds per step and the peak GPU memory.
    """
    for i in range(warmup):
        for step in steps.values():
            step(i)
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    peak = dict.fromkeys(steps, 0.0)
    for i in range(n_steps):
        for name, step in steps.items():
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            step(warmup + i)
            sync(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            if device.type == "cuda":
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device) / 2**30)
    return {
        name: {
            "wall_s": float(np.median(wall[name])),
            "cpu_s": float(np.median(cpu[name])),
            "peak_gib": peak[name],
        }
        for name in steps
    }


def train_step_fn(model, batches, device, amp: bool, lr: float = 1e-4) -> Callable[[int], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)

    def step(i: int) -> None:
        model.train()  # the methods share the Longformer; each sets its own train/eval split
        batch = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.clamp_logit_scales()

    return step


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    amp = device.type == "cuda"
    # On a CPU large chunk batches are memory-bound (measured: ~1.4x the CPU time per chunk at 14 chunks
    # than at 1); on a GPU they are what keeps it busy.
    args.chunk_batch = args.chunk_batch or (64 if amp else 1)
    rng = np.random.default_rng(args.seed)
    n_batches = args.warmup + args.steps
    notes = [make_notes(args.batch, args, rng) for _ in range(n_batches)]
    ehr = [torch.as_tensor(rng.standard_normal((args.batch, N_EHR_COLUMNS)), dtype=torch.float32, device=device)
           for _ in range(n_batches)]  # fmt: skip
    n_chunks = np.mean([sum(len(n) for n in b) / args.batch for b in notes])
    print(f"device={device} ({torch.cuda.get_device_name(device) if amp else 'CPU, fp32'}), "
          f"torch {torch.__version__}, threads={torch.get_num_threads()}")  # fmt: skip
    print(f"Longformer: {args.layers} layers ({args.frozen} frozen), hidden {args.hidden}, window {args.window}; "
          f"batch {args.batch} notes, {n_chunks:.1f} chunks/note of <= {args.max_tokens} tokens; "
          f"{args.steps} timed steps after {args.warmup} warm-up; ours: {args.chunk_batch} chunks per call")  # fmt: skip
    longformer = build_longformer(args).to(device)
    d_text = args.hidden
    results: dict[str, float] = {}

    ours_text = TextEncoder(
        longformer, freeze_layers=args.frozen, max_tokens=args.max_tokens, chunk_batch=args.chunk_batch
    )
    ours = build_contrastive(ours_text, d_text, device, args.seed)
    steps = {}
    if not args.skip_paper:
        # Same Longformer weights and the same frozen layers; only how the text side is run differs.
        paper = build_contrastive(OneNoteAtATime(longformer, args.frozen), d_text, device, args.seed)
        paper_batches = [
            {"ehr": e, "text": paper_inputs(n, args.max_tokens, device)}
            for e, n in zip(ehr, notes, strict=True)
        ]
        steps["paper"] = train_step_fn(paper, paper_batches, device, amp=False, lr=args.lr)
    batches = [{"ehr": e, "text": collate_notes(n, pad_id=1)} for e, n in zip(ehr, notes, strict=True)]
    steps["ours"] = train_step_fn(ours, batches, device, amp=amp, lr=args.lr)
    timing = measure(steps, args.steps, args.warmup, device)
    labels = {
        "paper": "paper  (one note at a time, fp32)",
        "ours": f"ours   ({args.chunk_batch} chunks/call, " + ("bf16)" if amp else "fp32)"),
    }
    for name, t in timing.items():
        results |= {f"{name}_pairs_per_s": args.batch / t["wall_s"], f"{name}_pairs_per_cpu_s": args.batch / t["cpu_s"],
                    f"{name}_peak_gib": t["peak_gib"]}  # fmt: skip
        print(f"{labels[name]:<42}{args.batch / t['wall_s']:9.2f} pairs/s  {args.batch / t['cpu_s']:9.2f} "
              f"pairs/CPU-s  peak {t['peak_gib']:6.2f} GiB")  # fmt: skip
    ours_rate = results["ours_pairs_per_s"]
    steps.clear()

    # Cache mode: embed notes once (inference), then train EHR tower + heads on the cached vectors.
    cache_notes = make_notes(args.notes, args, rng)
    sync(device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        cached = embed_chunked_notes(cache_notes, ours_text, pad_id=1, batch_chunks=64, progress=False)
    sync(device)
    embed_rate = args.notes / (time.perf_counter() - start)
    vectors = torch.as_tensor(cached, device=device)
    cache_model = build_contrastive(None, d_text, device, args.seed)
    cache_batches = []
    for e in ehr:
        rows = torch.as_tensor(rng.integers(0, args.notes, size=args.batch), device=device)
        cache_batches.append({"ehr": e, "text": vectors[rows]})
    cache_step = {"cache": train_step_fn(cache_model, cache_batches, device, amp=amp, lr=args.lr)}
    cache_rate = (
        args.batch / measure(cache_step, max(args.steps, 10), max(args.warmup, 2), device)["cache"]["wall_s"]
    )
    results |= {"cache_embed_notes_per_s": embed_rate, "cache_train_pairs_per_s": cache_rate}
    print(f"{'cache  embedding once (inference)':<42}{embed_rate:9.2f} notes/s")
    print(f"{'cache  training on cached vectors':<42}{cache_rate:9.2f} pairs/s")

    # Epoch times per pair (seconds): end-to-end with ours vs cache (embed once + train on vectors).
    e2e, embed, train = 1 / ours_rate, 1 / embed_rate, 1 / cache_rate
    results |= {
        "cache_epoch1_speedup": e2e / (embed + train),
        "cache_later_epoch_speedup": e2e / train,
        f"cache_{args.epochs}_epochs_speedup": args.epochs * e2e / (embed + args.epochs * train),
    }
    print("\nratios (higher = faster), measured in this run:")
    if "paper_pairs_per_s" in results:
        results["ours_vs_paper"] = ours_rate / results["paper_pairs_per_s"]
        print(f"  ours / paper pairs/s                          {results['ours_vs_paper']:8.2f}x")
    print(f"  cache vs end-to-end, epoch 1 (embed + train)  {results['cache_epoch1_speedup']:8.2f}x")
    print(f"  cache vs end-to-end, each later epoch         {results['cache_later_epoch_speedup']:8.2f}x")
    print(f"  cache vs end-to-end, {args.epochs} epochs in all          "
          f"{results[f'cache_{args.epochs}_epochs_speedup']:8.2f}x")  # fmt: skip
    if args.json:
        from ehrclip_kit.io import write_json

        write_json(
            args.json, {"args": {k: str(v) for k, v in vars(args).items()}, "device": str(device), **results}
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
