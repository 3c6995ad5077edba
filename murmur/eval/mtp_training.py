"""Self-distillation of multi-token-prediction heads (murmur.spec.mtp): `murmur train-mtp`.

The model transcribes unlabelled audio greedily in sequential mode (murmur.eval.analyze's
decode_windows: the engine's own windows, prompts and timestamp rules), each window is replayed
teacher-forced to get the final hidden state at every position, and head i learns to predict the
model's own token i places after the next one (cross-entropy over the heads' vocabulary subset; the
model stays frozen). More audio comes from the same files played at other speeds (`speeds`). A tenth
of the files is held out (at their own speed): their per-head accuracy and the tokens per forward that greedy
verification would reach are reported.

Never train on the evaluation sets (the stitched set, LJSpeech, AMI): the default audio is
../shared/data/librispeech_other_noref, which has no references.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from murmur.errors import ModelError
from murmur.spec.mtp import MTPHeads, user_heads_path, vocab_subset


def _speed(audio: np.ndarray, factor: float) -> np.ndarray:
    """`audio` played `factor` times faster (linear resampling: pitch moves with it)."""
    if factor == 1.0:
        return audio
    n = int(len(audio) / factor)
    return np.interp(np.arange(n) * factor, np.arange(len(audio)), audio).astype(np.float32)


@torch.inference_mode()
def _examples(loaded, windows, k: int):
    """(hidden [N, C], targets [N, k], -1 past a window's end): one row per position whose next
    token the model chose, targets the tokens 2..k+1 after it (end-of-text included)."""
    from murmur.eval.analyze import decoder_replay
    model, eot = loaded.model, loaded.tokenizer.eot

    def attend(kind, layer, scores, v):
        return torch.softmax(scores, dim=-1).to(v.dtype) @ v

    hs, ts = [], []
    for w in windows:
        feats = model.encoder(w.mel[None].to(model.device))
        cross = model.decoder.cross_kv(feats)
        seq = w.prompt + w.tokens + [eot]
        h = decoder_replay(model, cross, torch.tensor([seq[:-1]], device=model.device), attend)[0]
        p0 = len(w.prompt) - 1  # this position's logits chose the first generated token
        pos = np.arange(p0, len(seq) - 1)
        tgt = np.full((len(pos), k), -1, dtype=np.int64)
        for i in range(k):  # head i+1 at position p guesses seq[p + 2 + i]
            idx = pos + 2 + i
            ok = idx < len(seq)
            tgt[ok, i] = np.asarray(seq)[idx[ok]]
        hs.append(h[p0:len(seq) - 1].float().cpu())
        ts.append(torch.from_numpy(tgt))
    return torch.cat(hs), torch.cat(ts)


def _accuracy(heads: MTPHeads, h, t_sub) -> tuple[list[float], float]:
    """Per-head top-1 accuracy where a target exists, and the tokens per forward greedy
    verification reaches: 1 + the run of correct heads from the first."""
    with torch.no_grad():
        guess = heads(h).argmax(dim=-1)
    right = (guess == t_sub) & (t_sub >= 0)
    per = [float(right[:, i][t_sub[:, i] >= 0].float().mean()) if (t_sub[:, i] >= 0).any() else 0.0
           for i in range(heads.k)]
    run = torch.cumprod(right.long(), dim=1).sum(dim=1).float()
    return per, float(1 + run.mean())


def train_mtp(model_name: str = "tiny.en", audio_paths=None, out_path: str | os.PathLike | None = None,
              heldout_paths=None,
              k: int = 4, epochs: int = 10, lr: float = 3e-3, speeds=(1.0, 0.9, 1.1), batch: int = 256, weight_decay: float = 0.1,
              seed: int = 0, progress: bool = True) -> dict:
    """Train `k` heads for `model_name` on `audio_paths` and write them to `out_path` (default: the
    user's file, which load_heads prefers to the shipped one); measure them on `heldout_paths`
    (default: a tenth of the training files, then left out of training). Returns what was measured."""
    from murmur.audio.decode import load_audio
    from murmur.eval.analyze import decode_windows
    from murmur.eval.duo_calibration import default_calibration_audio
    from murmur.models.loading import get_model
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    paths = list(audio_paths) if audio_paths else default_calibration_audio(limit=1000)
    if not paths:
        raise ModelError("train-mtp needs audio")
    loaded = get_model(model_name)
    tok = loaded.tokenizer
    # held out by file, at the original speed only: another speed of a held-out file would leak
    if heldout_paths:
        val_paths, train_paths = list(heldout_paths), paths
    else:
        order = np.random.default_rng(seed).permutation(len(paths))
        n_val = max(1, len(paths) // 10) if len(paths) > 1 else 0
        val_paths, train_paths = [paths[i] for i in order[:n_val]], [paths[i] for i in order[n_val:]]
    val_audio = [load_audio(p) for p in val_paths]
    train_audio = [load_audio(p) for p in train_paths]
    train = []
    for f in speeds:
        train += decode_windows(loaded, [_speed(a, f) for a in train_audio])
        if progress:
            print(f"decoded at speed {f}: {len(train)} windows, {time.perf_counter() - t0:.0f} s", flush=True)
    val = decode_windows(loaded, val_audio) if val_audio else train[:1]
    h_tr, t_tr = _examples(loaded, train, k)
    h_va, t_va = _examples(loaded, val, k)
    emb = loaded.model.decoder.token_embedding.weight.detach().float().cpu()
    vocab = vocab_subset(t_tr[t_tr >= 0].unique().tolist(), tok.timestamp_begin, emb.shape[0], tok.eot)
    to_sub = torch.full((emb.shape[0],), -1, dtype=torch.long)
    to_sub[vocab] = torch.arange(len(vocab))

    def sub(t):
        return torch.where(t >= 0, to_sub[t.clamp(min=0)], torch.full_like(t, -1))

    s_tr, s_va = sub(t_tr), sub(t_va)
    heads = MTPHeads(k, emb.shape[1], vocab, emb[vocab])
    before = _accuracy(heads, h_va, s_va)
    opt = torch.optim.AdamW(heads.proj.parameters(), lr=lr, weight_decay=weight_decay)
    loss_f = torch.nn.CrossEntropyLoss(ignore_index=-1)
    log = []
    for ep in range(epochs):
        perm = torch.randperm(len(h_tr))
        tot = 0.0
        for b in range(0, len(perm), batch):
            idx = perm[b:b + batch]
            logits = heads(h_tr[idx])
            loss = loss_f(logits.reshape(-1, logits.shape[-1]), s_tr[idx].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += loss.item() * len(idx)
        log.append(round(tot / len(h_tr), 4))
        if progress and (ep % 10 == 9 or ep == epochs - 1):
            per, tpf = _accuracy(heads, h_va, s_va)
            print(f"epoch {ep + 1}: loss {log[-1]:.3f}, held-out accuracy per head "
                  f"{[round(x, 3) for x in per]}, tokens/forward {tpf:.2f}", flush=True)
    per, tpf = _accuracy(heads, h_va, s_va)
    made = (f"murmur train-mtp --model {model_name} --heads {k} --epochs {epochs} (self-distillation on "
            f"{len(train_paths)} files at speeds {list(speeds)}, {len(val_paths)} held out, seed {seed})")
    out = Path(out_path) if out_path else user_heads_path(loaded.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    torch.save(heads.state(loaded.name, made), tmp)
    os.replace(tmp, out)
    return {"model": loaded.name, "path": str(out), "bytes": out.stat().st_size, "heads": k,
            "files": len(train_paths), "heldout_files": len(val_paths), "windows": len(train) + len(val), "train_positions": len(h_tr),
            "heldout_positions": len(h_va), "vocab_subset": len(vocab),
            "heldout_accuracy_per_head": [round(x, 4) for x in per],
            "heldout_tokens_per_forward": round(tpf, 3),
            "untrained_tokens_per_forward": round(before[1], 3), "loss": log,
            "seconds": round(time.perf_counter() - t0, 1), "made": made}
