"""Pretrain a small wav2vec 2.0 on real speech, stock Hugging Face and sslfast side by side.

    python examples/pretrain_wav2vec2.py                      # speech synthesised by espeak-ng
    python examples/pretrain_wav2vec2.py --audio-dir my_wavs  # or your own audio files

Two copies of one randomly initialised ``Wav2Vec2ForPreTraining`` train in lockstep on the
same batches, the training loop of Hugging Face's ``run_wav2vec2_pretraining_no_trainer.py``
(loss summed over masked frames, gradients divided by their number, AdamW, Gumbel
temperature decay): one stock, with the example's numpy collator; one after the one line
``apply_sslfast_to_wav2vec2(model)`` with ``SslfastDataCollatorForWav2Vec2Pretraining``.
It prints each step's time, the per-frame contrastive loss and, at the end, the held-out
contrastive loss against chance ``ln(K+1)``, the step-time and peak-memory ratios
patched/stock, and saves the curves as a PNG.

Corpus. Nothing is downloaded. By default a few hundred sentences are synthesised with
espeak-ng (Debian/Ubuntu: ``apt-get install espeak-ng``; macOS: ``brew install espeak-ng``)
with varied voices, speeds and pitches, written as WAV files in ``--cache-dir`` (reused on
the next run). ``--audio-dir`` takes any folder of audio files soundfile reads (wav, flac,
ogg; mono or the first channel; resampled to 16 kHz). Needs ``pip install soundfile
matplotlib scipy`` (``pip install -e ".[examples]"``).

Memory: each variant's peak is measured in a fresh process (same init, same batch), after
one warm-up step: on a CPU the growth of the resident set's high-water mark (VmHWM, reset
through /proc/self/clear_refs) over three more steps; on a GPU ``max_memory_allocated`` over
``memory_allocated``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

SAMPLE_RATE = 16000
VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us+f2", "en-us+m3", "en-gb+f3",
          "en-us+f4", "en-gb-x-gbclan+m5"]
SUBJECTS = ["the old farmer", "a young girl", "my brother", "the teacher", "our neighbour", "the small dog",
            "a tired driver", "the captain", "her mother", "the quiet student", "a clever fox", "the baker"]
VERBS = ["carried", "painted", "found", "watched", "opened", "cleaned", "followed", "bought", "dropped",
         "remembered", "repaired", "described"]
OBJECTS = ["a heavy box", "the red door", "seven green apples", "the broken window", "an empty bottle",
           "the morning paper", "a wooden chair", "the long letter", "three silver coins", "the garden gate"]
PLACES = ["near the river", "after dinner", "in the kitchen", "before sunrise", "on the hill", "at the station",
          "during the storm", "behind the school", "under the bridge", "by the market"]


# ----------------------------------------------------------------------------- corpus


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}"
        if rng.random() < 0.5:
            s += f" and {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
        out.append(s)
    return out


def synthesise(cache_dir: Path, n: int, seed: int) -> list[Path]:
    """n WAV files of espeak-ng speech (voices, speeds 120-200 wpm, pitches 30-70 varied)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        sys.exit("espeak-ng is not installed: run `apt-get install espeak-ng` (Debian/Ubuntu) or "
                 "`brew install espeak-ng` (macOS), or pass --audio-dir with your own audio files.")
    cache_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i, text in enumerate(sentences(n, seed)):
        path = cache_dir / f"espeak_{seed}_{i:04d}.wav"
        if not path.exists():
            voice, speed, pitch = rng.choice(VOICES), rng.randint(120, 200), rng.randint(30, 70)
            subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), text],
                           check=True, capture_output=True)
        else:
            rng.choice(VOICES), rng.randint(120, 200), rng.randint(30, 70)  # keep the stream aligned
        paths.append(path)
    return paths


def load_audio(path: Path) -> np.ndarray:
    import soundfile as sf
    from scipy.signal import resample_poly

    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    audio = audio[:, 0]
    if rate != SAMPLE_RATE:
        g = math.gcd(rate, SAMPLE_RATE)
        audio = resample_poly(audio, SAMPLE_RATE // g, rate // g).astype(np.float32)
    return audio


# ----------------------------------------------------------------------------- model and data


def make_model(args):
    from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining

    config = Wav2Vec2Config(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
        # a 4-layer feature encoder with wav2vec 2.0's total stride (320 samples = 20 ms per frame)
        intermediate_size=2 * args.hidden, conv_dim=(args.conv_dim,) * 4, conv_kernel=(10, 8, 4, 4),
        conv_stride=(5, 4, 4, 4), conv_bias=True,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, do_stable_layer_norm=True,
        feat_extract_norm="layer", num_codevector_groups=2, num_codevectors_per_group=args.codevectors,
        codevector_dim=args.hidden, proj_codevector_dim=args.hidden, num_negatives=args.negatives,
        mask_time_prob=args.mask_prob, mask_time_length=args.mask_length, diversity_loss_weight=0.1, layerdrop=0.0,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
        feat_quantizer_dropout=0.0)
    torch.manual_seed(args.seed)
    return Wav2Vec2ForPreTraining(config)


class StockCollator:
    """What the Hugging Face example's DataCollatorForWav2Vec2Pretraining does (numpy masks
    and negatives on the CPU, via transformers' own functions)."""

    def __init__(self, model, feature_extractor):
        self.model, self.fe = model, feature_extractor

    def __call__(self, features):
        from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

        batch = self.fe.pad(features, padding="longest", return_tensors="pt")
        b = batch["input_values"].shape[0]
        t = int(self.model._get_feat_extract_output_lengths(batch["input_values"].shape[-1]))
        batch["sub_attention_mask"] = self.model._get_feature_vector_attention_mask(t, batch["attention_mask"])
        mask = _compute_mask_indices((b, t), self.model.config.mask_time_prob, self.model.config.mask_time_length,
                                     attention_mask=batch["sub_attention_mask"])
        negatives = _sample_negative_indices((b, t), self.model.config.num_negatives, mask_time_indices=mask)
        batch["mask_time_indices"] = torch.tensor(mask, dtype=torch.long)
        batch["sampled_negative_indices"] = torch.tensor(negatives, dtype=torch.long)
        return batch


def train_step(model, optimizer, batch):
    batch = dict(batch)
    batch.pop("sub_attention_mask", None)
    num_losses = batch["mask_time_indices"].sum()
    out = model(**batch)
    (out.loss / num_losses).backward()  # the example divides the gradients by the masked count
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out, num_losses


@torch.no_grad()
def held_out_loss(model, batches) -> float:
    """Contrastive loss per masked frame on held-out utterances, eval mode, fixed masks."""
    model.eval()
    total = frames = 0.0
    for batch in batches:
        batch = dict(batch)
        batch.pop("sub_attention_mask", None)
        batch.pop("sslfast_seed", None)
        out = model(**batch)
        total += float(out.contrastive_loss)
        frames += float(batch["mask_time_indices"].sum())
    model.train()
    return total / frames


def _status_mib(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _memory_worker(args, variant, feats, queue):
    """Fresh process: same init, one warm-up step (optimizer state), then the peak growth of
    three more steps: VmHWM over VmRSS after resetting the high-water mark (CPU), or
    max_memory_allocated over memory_allocated (GPU)."""
    from transformers import Wav2Vec2FeatureExtractor

    from sslfast.integrations.transformers import (SslfastDataCollatorForWav2Vec2Pretraining,
                                                   apply_sslfast_to_wav2vec2)

    torch.set_num_threads(args.threads)
    model = make_model(args).to(args.device)
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True,
                                  return_attention_mask=True)
    if variant == "sslfast":
        apply_sslfast_to_wav2vec2(model)
        collate = SslfastDataCollatorForWav2Vec2Pretraining(model=model, feature_extractor=fe, seed=args.seed)
    else:
        collate = StockCollator(model, fe)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model.train()
    train_step(model, opt, to_device(collate(feats), args.device))
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux)
        base = _status_mib("VmRSS")
    for _ in range(3):
        train_step(model, opt, to_device(collate(feats), args.device))
    if cuda:
        torch.cuda.synchronize()
        queue.put((torch.cuda.max_memory_allocated() - base) / 2**20)
    else:
        queue.put(_status_mib("VmHWM") - base)


def peak_memory_of(args, variant, feats) -> float:
    """MiB the peak grows by over a few training steps of one variant, in its own process."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_worker, args=(args, variant, feats, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------- main


def plot(summary: dict, log: dict, out: Path) -> None:
    """Draw the loss curves and the step times of a run (its JSON holds both) into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chance, source = summary["chance"], summary["source"]
    med = {k: summary["step_ms_median"][k] / 1e3 for k in ("stock", "sslfast")}
    memory = summary["peak_mib"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for k, c in (("stock", "tab:blue"), ("sslfast", "tab:orange")):
        a.plot(log[k]["step"], log[k]["loss"], color=c, alpha=0.35, lw=0.8)
        w = max(1, min(10, len(log[k]["loss"])))  # a run shorter than 10 steps plots a shorter mean
        sm = np.convolve(log[k]["loss"], np.ones(w) / w, mode="valid")
        a.plot(log[k]["step"][w - 1:], sm, color=c, label=f"{k} (train, {w}-step mean)")
        a.plot(log[k]["eval_step"], log[k]["eval"], "o--", color=c, ms=3, label=f"{k} (held out)")
        b.plot(log[k]["step"], [1e3 * t for t in log[k]["time"]], color=c, lw=0.8,
               label=f"{k}: median {1e3 * med[k]:.0f} ms, peak +{memory[k]:.0f} MiB")
    a.axhline(chance, color="gray", ls=":", label=f"chance ln(K+1) = {chance:.2f}")
    a.set_xlabel("step")
    a.set_ylabel("contrastive loss per masked frame (nats)")
    a.legend(fontsize=7)
    a.set_title(f"wav2vec 2.0 pretraining ({source.split(';')[0].split(' (')[0]})", fontsize=9)
    b.set_xlabel("step")
    b.set_ylabel("step time (ms)")
    b.set_yscale("log")
    b.legend(fontsize=7)
    b.set_title(f"step time, {summary['device']}: sslfast/stock = {summary['step_time_ratio']:.2f}\n"
                "(collator + forward + backward + AdamW)", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--audio-dir", type=Path, help="folder of audio files (default: synthesise with espeak-ng)")
    p.add_argument("--cache-dir", type=Path, default=Path(".cache/espeak_speech"))
    p.add_argument("--utterances", type=int, default=400)
    p.add_argument("--held-out", type=float, default=0.1, help="fraction of utterances held out")
    p.add_argument("--max-seconds", type=float, default=1.0, help="crop length")
    p.add_argument("--steps", type=int, default=360)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--conv-dim", type=int, default=48)
    p.add_argument("--codevectors", type=int, default=64)
    p.add_argument("--negatives", type=int, default=25)
    p.add_argument("--mask-prob", type=float, default=0.5, help="mask_time_prob (wav2vec 2.0 base: 0.65)")
    p.add_argument("--mask-length", type=int, default=4, help="mask_time_length (base: 10; shorter spans "
                   "learn faster on short crops)")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("examples/pretrain_wav2vec2.png"))
    p.add_argument("--replot", type=Path, metavar="JSON", help="only redraw --out from a run's saved JSON")
    args = p.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    if args.replot is not None:
        saved = json.loads(args.replot.read_text())
        plot(saved["summary"], saved["log"], args.out)
        print(f"saved {args.out}")
        return saved["summary"]

    try:
        import matplotlib
        import soundfile  # noqa: F401
        import scipy  # noqa: F401
    except ImportError as e:
        sys.exit(f"{e.name} is missing: pip install soundfile matplotlib scipy (or pip install -e '.[examples]')")
    from transformers import Wav2Vec2FeatureExtractor

    from sslfast.integrations.transformers import (SslfastDataCollatorForWav2Vec2Pretraining,
                                                   apply_sslfast_to_wav2vec2)

    torch.set_num_threads(args.threads)
    if args.audio_dir is not None:
        exts = {".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"}
        paths = sorted(q for q in args.audio_dir.rglob("*") if q.suffix.lower() in exts)
        if not paths:
            sys.exit(f"no audio files in {args.audio_dir}")
        source = str(args.audio_dir)
    else:
        t0 = time.perf_counter()
        paths = synthesise(args.cache_dir, args.utterances, args.seed)
        source = f"espeak-ng, {len(paths)} sentences ({time.perf_counter() - t0:.0f} s to synthesise)"

    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True,
                                  return_attention_mask=True)
    max_len = int(args.max_seconds * SAMPLE_RATE)
    data = [{"input_values": fe(load_audio(q), sampling_rate=SAMPLE_RATE, max_length=max_len,
                                truncation=True).input_values[0]} for q in paths]
    seconds = sum(len(d["input_values"]) for d in data) / SAMPLE_RATE
    rng = random.Random(args.seed)
    rng.shuffle(data)
    n_eval = max(args.batch_size, int(len(data) * args.held_out))
    eval_data, train_data = data[:n_eval], data[n_eval:]
    print(f"corpus: {source}; {len(data)} utterances, {seconds / 60:.1f} min after cropping to "
          f"{args.max_seconds:.1f} s; {len(train_data)} train, {len(eval_data)} held out")

    stock = make_model(args).to(args.device)
    patched = copy.deepcopy(stock)
    apply_sslfast_to_wav2vec2(patched)  # the one line
    print(f"model: {sum(p.numel() for p in stock.parameters()) / 1e6:.2f} M parameters, {args.layers} layers, "
          f"hidden {args.hidden}, K = {args.negatives} negatives, {torch.get_num_threads()} threads")
    collate = {"stock": StockCollator(stock, fe),
               "sslfast": SslfastDataCollatorForWav2Vec2Pretraining(model=patched, feature_extractor=fe,
                                                                   seed=args.seed)}
    models = {"stock": stock, "sslfast": patched}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=args.lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
            for k, m in models.items()}
    scheds = {k: torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / args.warmup))
              for k, o in opts.items()}
    # held-out batches: the same masks and negatives for both models (made once, by the stock collator)
    np.random.seed(args.seed + 1)
    eval_batches = [to_device(collate["stock"](eval_data[i:i + args.batch_size]), args.device)
                    for i in range(0, len(eval_data) - args.batch_size + 1, args.batch_size)]
    chance = math.log(args.negatives + 1)

    log = {k: {"step": [], "loss": [], "time": [], "eval_step": [], "eval": []} for k in models}
    order = []
    for k in models:
        log[k]["eval_step"].append(0)
        log[k]["eval"].append(held_out_loss(models[k], eval_batches))
    np.random.seed(args.seed)
    for step in range(1, args.steps + 1):
        if not order:
            order = list(range(len(train_data)))
            rng.shuffle(order)
        idx = [order.pop() for _ in range(min(args.batch_size, len(order)))]
        feats = [train_data[i] for i in idx]
        temperature = max(2.0 * 0.995 ** step, 0.5)
        for k in (("stock", "sslfast") if step % 2 else ("sslfast", "stock")):  # alternate who runs first
            model = models[k]
            model.train()
            model.set_gumbel_temperature(temperature)
            t0 = time.perf_counter()
            batch = to_device(collate[k](feats), args.device)
            out, n = train_step(model, opts[k], batch)
            scheds[k].step()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            log[k]["time"].append(time.perf_counter() - t0)
            log[k]["step"].append(step)
            log[k]["loss"].append(float(out.contrastive_loss.detach()) / float(n))
        if step % args.eval_every == 0 or step == args.steps:
            for k in models:
                log[k]["eval_step"].append(step)
                log[k]["eval"].append(held_out_loss(models[k], eval_batches))
            print(f"step {step:4d}  train loss/frame stock {log['stock']['loss'][-1]:.3f} sslfast "
                  f"{log['sslfast']['loss'][-1]:.3f}  held-out stock {log['stock']['eval'][-1]:.3f} sslfast "
                  f"{log['sslfast']['eval'][-1]:.3f}  (chance ln(K+1) = {chance:.3f})  step ms stock "
                  f"{1e3 * statistics.median(log['stock']['time'][-args.eval_every:]):.0f} sslfast "
                  f"{1e3 * statistics.median(log['sslfast']['time'][-args.eval_every:]):.0f}")

    # peak memory of a few training steps per variant, each in its own forked child
    feats = [train_data[i] for i in range(args.batch_size)]
    memory = {k: peak_memory_of(args, k, feats) for k in models}
    skip = min(10, args.steps // 5)  # warm-up steps left out of the medians
    med = {k: statistics.median(log[k]["time"][skip:]) for k in models}
    summary = {
        "source": source, "steps": args.steps, "batch_size": args.batch_size, "chance": chance,
        "held_out_final": {k: log[k]["eval"][-1] for k in models},
        "held_out_initial": {k: log[k]["eval"][0] for k in models},
        "step_ms_median": {k: 1e3 * med[k] for k in models}, "step_time_ratio": med["sslfast"] / med["stock"],
        "peak_mib": memory, "peak_ratio": memory["sslfast"] / memory["stock"] if memory["stock"] > 0 else None,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda")
        else f"cpu ({torch.get_num_threads()} threads)",
    }
    print(json.dumps(summary, indent=1))
    verdict = all(v < chance - 0.5 for v in summary["held_out_final"].values())
    print(f"held-out loss below chance ln(K+1) = {chance:.3f} by > 0.5 nats for both: {verdict}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"summary": summary, "log": log}, indent=1))
    plot(summary, log, args.out)
    print(f"saved {args.out} and {args.out.with_suffix('.json')}")
    return summary


if __name__ == "__main__":
    main()
