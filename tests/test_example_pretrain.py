"""Smoke test of examples/pretrain_wav2vec2.py on a user's folder of audio files.

The example is the README's real-speech run; this runs it end to end for three steps on
synthetic chirps written with soundfile (espeak-ng is not needed), in a subprocess as a user
would, and checks what it promises to write: the JSON summary and log, the PNG, and a
``--replot`` of the JSON. Both variants start from the same weights and see the same batches,
so their held-out loss before the first step must agree (an independent check that the patched
model computes the stock loss).
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sf = pytest.importorskip("soundfile")
pytest.importorskip("matplotlib")
pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pretrain_wav2vec2.py"


def _write_chirps(folder: Path, n: int = 12) -> None:
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    for i in range(n):
        f0 = 120 + 20 * i
        x = 0.3 * np.sin(2 * np.pi * (f0 * t + 30 * t * t)) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
        x = x + 0.02 * rng.standard_normal(t.size)
        sf.write(folder / f"u{i:02d}.wav", x.astype(np.float32), 16000)


def test_example_runs_on_an_audio_folder_and_replots(tmp_path):
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    _write_chirps(wavs)
    out = tmp_path / "run.png"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    run = subprocess.run([sys.executable, str(EXAMPLE), "--audio-dir", str(wavs), "--steps", "3",
                          "--batch-size", "4", "--eval-every", "2", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    saved = json.loads(out.with_suffix(".json").read_text())
    summary, log = saved["summary"], saved["log"]
    assert summary["steps"] == 3 and summary["chance"] == pytest.approx(math.log(26))
    for k in ("stock", "sslfast"):
        assert len(log[k]["loss"]) == 3 and all(math.isfinite(v) for v in log[k]["loss"])
        assert math.isfinite(summary["held_out_final"][k]) and summary["step_ms_median"][k] > 0
    # Same init, same batches: the untrained models' held-out loss is one number (fp32 sums).
    assert summary["held_out_initial"]["sslfast"] == pytest.approx(summary["held_out_initial"]["stock"], rel=1e-5)
    assert out.stat().st_size > 10_000

    redrawn = tmp_path / "again.png"
    replot = subprocess.run([sys.executable, str(EXAMPLE), "--replot", str(out.with_suffix(".json")),
                             "--out", str(redrawn)], capture_output=True, text=True, env=env, timeout=300)
    assert replot.returncode == 0, replot.stderr[-3000:]
    assert redrawn.stat().st_size > 10_000
