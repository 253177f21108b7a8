"""The ``ehrclip`` command. Each subcommand lives in the module that owns the concept.

A subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int | None``. Modules are imported
only when their subcommand runs, so ``ehrclip --help`` stays fast (no torch import).
Works under ``torchrun`` too: ``torchrun --nproc_per_node 2 -m ehrclip_kit.cli pretrain ...``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("ehrclip_kit.data.synthetic", "write a synthetic world in the MIMIC-IV / -Note / -ECG layouts"),
    "cohort": (
        "ehrclip_kit.data.recipes",
        "build task tables, features.json, notes and attrition from MIMIC-IV",
    ),
    "ecg-index": ("ehrclip_kit.data.ecg_index", "index and validate MIMIC-IV-ECG or PTB-XL waveforms"),
    "pretrain": ("ehrclip_kit.pretrain", "masked and/or contrastive pretraining (EHR-note, or ECG presets)"),
    "finetune": (
        "ehrclip_kit.downstream",
        "text-free fine-tuning of an EHR encoder (or a baseline) + test metrics",
    ),
    "ablation": ("ehrclip_kit.ablation", "baselines x pretraining stages x label fractions x seeds"),
}


def _overview() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: ehrclip COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "ehrclip COMMAND --help shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_overview())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ehrclip: unknown command {name!r}\n\n{_overview()}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"ehrclip {name}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
