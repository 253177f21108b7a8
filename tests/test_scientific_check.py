"""The kit's scientific claim on its own world (the slowest test: ~24 min on 2 cores, two 3,000-patient worlds).

With a high text signal the note states the latent conditions the readmission outcome depends on, which the
tables only proxy; EHR <-> note pretraining should then make the text-free EHR encoder better with few labels
than random init (non-overlapping 95 % CIs over 5 seeds). With text signal 0 the note says nothing about the
patient, so aligning with it must add nothing: contrastive pretraining is then no better than random init,
and masked + contrastive no better than masked alone. (Masked pretraining on its own does help at any text
signal, so masked + contrastive vs random stays significant at signal 0 too; that gain is not the text's.)
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pandas as pd
import pytest

from ehrclip_kit.ablation import AblationConfig, ablation_preset, format_table, run_ablation

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]  # each world: ~12 min on 2 cores

FRACTIONS = (0.05, 0.1)
SEEDS = 5
PATIENTS = int(os.environ.get("EHRCLIP_CHECK_PATIENTS", 3000))


def check_config() -> AblationConfig:
    """The README's `workshop` ablation preset, restricted to readmission, the methods compared and 5-10 % labels."""
    return dataclasses.replace(
        ablation_preset("workshop"),
        tasks=("readmission_30d",),
        methods=("random", "masked", "contrastive", "masked+contrastive"),
        label_fractions=FRACTIONS,
        seeds=SEEDS,
        n_boot=0,
        progress=False,
    )


def summary_for(tmp_path_factory, text_signal: float) -> pd.DataFrame:
    root = tmp_path_factory.mktemp(f"check-{text_signal}")
    for args in (
        ["synth", "--out", str(root / "world"), "--patients", str(PATIENTS), "--seed", "0",
         "--text-signal", str(text_signal), "--no-ecg", "--quiet"],
        ["cohort", "--mimic", str(root / "world"), "--out", str(root / "cohort")],
    ):  # fmt: skip
        subprocess.run([sys.executable, "-m", "ehrclip_kit.cli", *args], check=True, capture_output=True)
    _, summary = run_ablation(root / "cohort", None, check_config())
    print(f"text signal {text_signal}:\n{format_table(summary)}")
    return summary[summary["metric"] == "auroc"].set_index(["method", "label_fraction"])


@pytest.fixture(scope="module")
def high(tmp_path_factory):
    return summary_for(tmp_path_factory, 0.9)


@pytest.fixture(scope="module")
def zero(tmp_path_factory):
    return summary_for(tmp_path_factory, 0.0)


def _cell(summary: pd.DataFrame, method: str, fraction: float) -> tuple[float, float, float]:
    row = summary.loc[(method, fraction)]
    return float(row["mean"]), float(row["ci_low"]), float(row["ci_high"])


def _separated(better, worse) -> bool:
    return better[1] > worse[2]


def _overlap(a, b) -> bool:
    return a[1] <= b[2] and b[1] <= a[2]


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_high_text_signal_masked_contrastive_beats_random_init(high, fraction):
    pre, rnd = _cell(high, "masked+contrastive", fraction), _cell(high, "random", fraction)
    assert _separated(pre, rnd), f"masked+contrastive {pre} vs random {rnd}: 95 % CIs overlap"


def test_high_text_signal_contrastive_alone_beats_random_init(high):
    # Alignment from random init, without the masked stage, separates from random init at 10 % labels; at 5 %
    # its mean is also higher but the CIs touch (see the README table), so only 10 % is asserted.
    pre, rnd = _cell(high, "contrastive", 0.1), _cell(high, "random", 0.1)
    assert _separated(pre, rnd), f"contrastive {pre} vs random {rnd}: 95 % CIs overlap"


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_zero_text_signal_contrastive_is_no_better_than_random(zero, fraction):
    con, rnd = _cell(zero, "contrastive", fraction), _cell(zero, "random", fraction)
    assert _overlap(con, rnd), f"contrastive {con} vs random {rnd} differ at text signal 0"


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_zero_text_signal_alignment_adds_nothing(zero, fraction):
    mc, masked = _cell(zero, "masked+contrastive", fraction), _cell(zero, "masked", fraction)
    assert _overlap(mc, masked), f"masked+contrastive {mc} vs masked {masked} differ"


def test_the_text_gain_shrinks_without_text(high, zero):
    for f in FRACTIONS:
        g_high = _cell(high, "masked+contrastive", f)[0] - _cell(high, "masked", f)[0]
        g_zero = _cell(zero, "masked+contrastive", f)[0] - _cell(zero, "masked", f)[0]
        assert g_high > g_zero, (
            f"label fraction {f}: gain over masked {g_high:.3f} (high) vs {g_zero:.3f} (zero)"
        )
