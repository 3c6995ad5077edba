"""How local is Whisper's attention? `murmur analyze attention AUDIO`.

Each 30-s window of the audio is decoded greedily, then run once more teacher-forced through an
instrumented copy of the forward pass (same weights, explicit softmax) that exposes every head's
weights: encoder self-attention, decoder self-attention over the output tokens, and decoder
cross-attention over the speech frames. Per layer and head we report

* encoder self:  mass within +-`enc_radius` frames of the query frame, mean distance (frames)
* decoder self:  mass on the `sink` first tokens, on the last `window` tokens, mean distance (tokens)
* decoder cross: mass within [anchor - back, anchor + ahead] frames, where the anchor is the frame of
                 the last timestamp emitted so far, and the median distance of the peak frame to it

The "non-local" mass (1 - sink - local) is the score DuoAttention calibration uses (murmur.eval.duo_calibration).
Heat maps of the local mass go to a PNG (matplotlib, Agg backend).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from murmur.audio.decode import N_SAMPLES, load_audio
from murmur.engine.duo import CROSS_AHEAD, CROSS_BACK, CROSS_SINK, SELF_SINK, SELF_WINDOW

ENC_RADIUS = 50


@dataclass
class Window:
    mel: torch.Tensor  # [n_mels, 3000]
    prompt: list[int]
    tokens: list[int]  # generated, timestamps included, no eot
    content_frames: int  # encoder frames holding audio (the rest is padding)


def decode_windows(loaded, audio, max_windows: int | None = None, batch_size: int = 8) -> list[Window]:
    """The windows of a sequential (full-mode) greedy transcription of `audio` (one array, or a list
    of them decoded side by side), with the prompts the long-form rules gave them (previous text
    included), as the engine decoded them. `max_windows` first cuts each audio to that many 30 s."""
    from murmur.engine.decoding import DecodingOptions
    from murmur.engine.longform import ChunkStream
    from murmur.engine.runner import Engine
    from murmur.engine.scheduler import StreamScheduler
    audios = [audio] if isinstance(audio, np.ndarray) else list(audio)
    if max_windows:
        audios = [a[: max_windows * N_SAMPLES] for a in audios]
    tok = loaded.tokenizer
    tok.language = "en"
    opts = DecodingOptions(temperature=(0.0,), language="en")
    streams = [ChunkStream(np.asarray(a, dtype=np.float32), tok, opts, index=i,
                           n_text_ctx=loaded.model.dims.n_text_ctx, language="en") for i, a in enumerate(audios)]
    recorded = []

    class _Rec(StreamScheduler):
        def complete(self, req):
            n = len(self.retries)
            super().complete(req)
            if len(self.retries) == n:
                recorded.append(req)

    Engine(loaded, opts, batch_size=batch_size).run(_Rec(streams, max_open=2 * batch_size))
    return [Window(r.mel, list(r.prompt), list(r.tokens), max(1, -(-r.tag["size"] // 2))) for r in recorded]


@torch.inference_mode()
def attention_weights(model, win: Window, encoder: bool = True):
    """Teacher-forced forward with explicit attention. Yields ('enc', layer, w[H, F, F]),
    ('self', layer, w[H, T, T]) and ('cross', layer, w[H, T, F]) for the window."""
    dev = model.device
    enc = model.encoder
    edt = enc.dtype  # the encoder may run narrower than the decoder
    x = F.gelu(enc.conv1(win.mel[None].to(dev, edt)))
    x = F.gelu(enc.conv2(x)).transpose(1, 2)
    x = x + enc.positional_embedding[: x.shape[1]].to(edt)
    for i, block in enumerate(enc.blocks):
        a = block.attn
        h = block.attn_ln(x)
        q, k, v = a.heads(a.query(h)), a.heads(a.key(h)), a.heads(a.value(h))
        w = torch.softmax((q @ k.transpose(-1, -2)).float() * (q.shape[-1] ** -0.5), dim=-1)
        if encoder:
            yield "enc", i, w[0]
        x = x + a.out(a.merge((w.to(edt) @ v)))
        x = x + block.mlp(block.mlp_ln(x))
    cross = model.decoder.cross_kv(enc.ln_post(x))
    got = []

    def attend(kind, layer, scores, v):
        w = torch.softmax(scores, dim=-1)
        got.append((kind, layer, w[0]))
        return w.to(v.dtype) @ v

    decoder_replay(model, cross, torch.tensor([win.prompt + win.tokens], device=dev), attend)
    yield from got


def decoder_replay(model, cross, toks: torch.Tensor, attend) -> torch.Tensor:
    """Teacher-forced decoder pass over `toks` [1, T] against speech K/V `cross` (decoder.cross_kv)
    with the attention left to `attend(kind, layer, scores, v) -> [1, H, T, D]`: kind 'self' or
    'cross', scores the float logits (self: causal, -inf above the diagonal). Returns the final
    hidden states [1, T, C] (after the last layer norm)."""
    dec, dt = model.decoder, model.dtype
    t = toks.shape[1]
    x = dec.token_embedding(toks) + dec.positional_embedding[:t]
    causal = torch.ones(t, t, dtype=torch.bool, device=toks.device).tril()
    for i, block in enumerate(dec.blocks):
        a = block.attn
        h = block.attn_ln(x)
        q, k, v = a.heads(a.query(h)), a.heads(a.key(h)), a.heads(a.value(h))
        s = (q @ k.transpose(-1, -2)).float() * (q.shape[-1] ** -0.5)
        x = x + a.out(a.merge(attend("self", i, s.masked_fill(~causal, float("-inf")), v).to(dt)))
        ca = block.cross_attn
        h = block.cross_attn_ln(x)
        q = ca.heads(ca.query(h))
        k, v = (t.to(q.dtype) for t in cross[i])
        s = (q @ k.transpose(-1, -2)).float() * (q.shape[-1] ** -0.5)
        x = x + ca.out(ca.merge(attend("cross", i, s, v).to(dt)))
        x = x + block.mlp(block.mlp_ln(x))
    return dec.ln(x)


def anchors(win: Window, timestamp_begin: int) -> np.ndarray:
    """Per decoder query position: frame of the last timestamp among the tokens fed so far, -1 if none."""
    seq = win.prompt + win.tokens
    out = np.full(len(seq), -1, dtype=np.int64)
    last = -1
    for i, tk in enumerate(seq):
        if i >= len(win.prompt) and tk >= timestamp_begin:
            last = tk - timestamp_begin
        out[i] = last
    return out


class Accumulator:
    """Sums of per-head locality measures over windows; `result()` averages them per query."""

    def __init__(self, n_enc: int, n_dec: int, n_head_enc: int, n_head_dec: int,
                 self_sink=SELF_SINK, self_window=SELF_WINDOW, cross_sink=CROSS_SINK,
                 cross_back=CROSS_BACK, cross_ahead=CROSS_AHEAD, enc_radius=ENC_RADIUS):
        self.p = dict(self_sink=self_sink, self_window=self_window, cross_sink=cross_sink,
                      cross_back=cross_back, cross_ahead=cross_ahead, enc_radius=enc_radius)
        z = lambda n, h: np.zeros((n, h))  # noqa: E731
        self.enc = {k: z(n_enc, n_head_enc) for k in ("local", "dist")}
        self.self = {k: z(n_dec, n_head_dec) for k in ("sink", "local", "dist")}
        self.cross = {k: z(n_dec, n_head_dec) for k in ("sink", "local", "peak_dist")}
        self.n = {"enc": 0, "self": 0, "cross": 0}
        self.peak_dists: dict[tuple[int, int], list] = {}

    def add(self, kind: str, layer: int, w: torch.Tensor, win: Window, anchor: np.ndarray) -> None:
        p = self.p
        w = w.float().cpu()
        if kind == "enc":
            c = max(1, win.content_frames)
            w = w[:, :c, :]  # queries over audio, not padding
            i = torch.arange(w.shape[1])[:, None]
            j = torch.arange(w.shape[2])[None, :]
            d = (i - j).abs().float()
            self.enc["local"][layer] += (w * (d <= p["enc_radius"])).sum(-1).sum(-1).numpy()
            self.enc["dist"][layer] += (w * d).sum(-1).sum(-1).numpy()
            if layer == 0:
                self.n["enc"] += w.shape[1]
            return
        q0 = len(win.prompt) - 1  # the query that predicts the first generated token
        if kind == "self":
            w = w[:, q0:, :]
            qi = torch.arange(q0, q0 + w.shape[1])[:, None]
            kj = torch.arange(w.shape[2])[None, :]
            sink = kj < p["self_sink"]
            local = (kj > qi - p["self_window"]) & (kj <= qi) & ~sink
            self.self["sink"][layer] += (w * sink).sum(-1).sum(-1).numpy()
            self.self["local"][layer] += (w * local).sum(-1).sum(-1).numpy()
            self.self["dist"][layer] += (w * (qi - kj).clamp(min=0)).sum(-1).sum(-1).numpy()
            if layer == 0:
                self.n["self"] += w.shape[1]
            return
        # cross: queries after the first timestamp
        a = anchor[q0:q0 + w.shape[1] - 0]
        ok = np.flatnonzero(a >= 0)
        if not len(ok):
            return
        w = w[:, q0:, :][:, ok, :]
        a = torch.from_numpy(a[ok])[:, None]
        fj = torch.arange(w.shape[2])[None, :]
        sink = fj < p["cross_sink"]
        local = (fj >= a - p["cross_back"]) & (fj <= a + p["cross_ahead"]) & ~sink
        self.cross["sink"][layer] += (w * sink).sum(-1).sum(-1).numpy()
        self.cross["local"][layer] += (w * local).sum(-1).sum(-1).numpy()
        peak = w.argmax(-1)  # [H, Q]
        dist = (peak - a[:, 0][None, :]).float()
        for h in range(w.shape[0]):
            self.peak_dists.setdefault((layer, h), []).extend(dist[h].tolist())
        if layer == 0:
            self.n["cross"] += len(ok)

    def result(self) -> dict:
        out = {"params": dict(self.p), "queries": dict(self.n)}
        ne, ns, nc = max(self.n["enc"], 1), max(self.n["self"], 1), max(self.n["cross"], 1)
        out["encoder"] = {k: (v / ne).round(4).tolist() for k, v in self.enc.items()}
        out["decoder_self"] = {k: (v / ns).round(4).tolist() for k, v in self.self.items()}
        out["decoder_self"]["nonlocal"] = (1 - (self.self["sink"] + self.self["local"]) / ns).round(4).tolist()
        cr = {k: (self.cross[k] / nc).round(4).tolist() for k in ("sink", "local")}
        cr["nonlocal"] = (1 - (self.cross["sink"] + self.cross["local"]) / nc).round(4).tolist()
        L, H = self.cross["local"].shape
        med = np.zeros((L, H))
        ahead = np.zeros((L, H))
        for (layer, h), ds in self.peak_dists.items():
            med[layer, h] = float(np.median(np.abs(ds))) if ds else 0.0
            ahead[layer, h] = float(np.mean(np.asarray(ds) >= 0)) if ds else 0.0
        cr["peak_dist_median"] = med.round(1).tolist()
        cr["peak_ahead_frac"] = ahead.round(3).tolist()
        out["decoder_cross"] = cr
        return out


def collect(loaded, audios, max_windows: int | None = None, encoder: bool = True, **params) -> dict:
    """Locality statistics over the windows of `audios` (arrays or paths)."""
    m = loaded.model
    d = m.dims
    acc = Accumulator(d.n_audio_layer, d.n_text_layer, d.n_audio_head, d.n_text_head, **params)
    tsb = loaded.tokenizer.timestamp_begin
    windows = decode_windows(loaded, [a if isinstance(a, np.ndarray) else load_audio(a) for a in audios],
                             max_windows)
    for win in windows:
        anc = anchors(win, tsb)
        for kind, layer, w in attention_weights(m, win, encoder=encoder):
            acc.add(kind, layer, w, win, anc)
    res = acc.result()
    res["windows"] = len(windows)
    return res


def _head_table(lines: list[str], title: str, cells: list[list[str]]) -> None:
    """A title, then one row per layer with one formatted cell per head."""
    lines.append(title)
    lines.append("layer | " + " | ".join(f"head {h}" for h in range(len(cells[0]))))
    for layer, row in enumerate(cells):
        lines.append(f"{layer:5d} | " + " | ".join(row))


def format_table(res: dict) -> str:
    lines = []
    p = res["params"]
    enc, ds, dc = res.get("encoder"), res["decoder_self"], res["decoder_cross"]
    if enc and res["queries"]["enc"]:
        _head_table(lines, f"encoder self-attention: mass within +-{p['enc_radius']} frames | mean distance (frames)",
                    [[f"{a:.2f} {b:5.0f}" for a, b in zip(lo, di)] for lo, di in zip(enc["local"], enc["dist"])])
        lines.append("")
    _head_table(lines, f"decoder self-attention over output tokens: sink (first {p['self_sink']}) + local "
                       f"(last {p['self_window']}) mass | mean distance (tokens)",
                [[f"{s:.2f}+{lo:.2f} {di:4.1f}" for s, lo, di in zip(*cells)]
                 for cells in zip(ds["sink"], ds["local"], ds["dist"])])
    lines.append("")
    _head_table(lines, f"decoder cross-attention over speech frames: mass within [last stamp - {p['cross_back']}, "
                       f"+{p['cross_ahead']}] frames | median |peak - stamp| (frames) | peak ahead of stamp",
                [[f"{lo:.2f} {md:4.0f} {ah:.2f}" for lo, md, ah in zip(*cells)]
                 for cells in zip(dc["local"], dc["peak_dist_median"], dc["peak_ahead_frac"])])
    lines.append(f"\nwindows: {res.get('windows')}, decoder queries: self {res['queries']['self']}, "
                 f"cross {res['queries']['cross']}")
    return "\n".join(lines)


def _heatmaps(res: dict, example, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = []
    if res.get("encoder") and res["queries"]["enc"]:
        panels.append((f"encoder self: mass within ±{res['params']['enc_radius']} frames", res["encoder"]["local"]))
    ds = np.asarray(res["decoder_self"]["sink"]) + np.asarray(res["decoder_self"]["local"])
    panels.append((f"decoder self: sink+last {res['params']['self_window']} tokens", ds))
    panels.append(("decoder cross: mass near last timestamp", res["decoder_cross"]["local"]))
    n = len(panels) + (2 if example is not None else 0)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.8))
    axes = np.atleast_1d(axes)
    for ax, (title, grid) in zip(axes, panels):
        g = np.asarray(grid)
        im = ax.imshow(g, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for (i, j), v in np.ndenumerate(g):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(g.shape[1]))
        ax.set_yticks(range(g.shape[0]))
    fig.colorbar(im, ax=axes[len(panels) - 1], fraction=0.046)
    if example is not None:
        (ls, hs, ws), (lc, hc, wc) = example
        ax = axes[len(panels)]
        ax.imshow(ws, cmap="magma", aspect="auto", vmax=np.quantile(ws, 0.995) + 1e-9)
        ax.set_title(f"self-attn, layer {ls} head {hs} (window 1)", fontsize=9)
        ax.set_xlabel("key token")
        ax.set_ylabel("query token")
        ax = axes[len(panels) + 1]
        ax.imshow(wc, cmap="magma", aspect="auto", vmax=np.quantile(wc, 0.995) + 1e-9)
        ax.set_title(f"cross-attn, layer {lc} head {hc} (window 1)", fontsize=9)
        ax.set_xlabel("frame (20 ms)")
        ax.set_ylabel("query token")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def analyze_attention(audio_path, model="tiny.en", out_dir="attention_out", max_windows: int | None = 4,
                      **params) -> dict:
    """Locality of every layer and head; writes attention.txt, attention.json and attention.png to
    `out_dir` and returns the statistics (with 'table', 'png', 'json' paths)."""
    from murmur.models.loading import get_model
    loaded = get_model(model)
    audio = load_audio(audio_path) if not isinstance(audio_path, np.ndarray) else audio_path
    res = collect(loaded, [audio], max_windows=max_windows, **params)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # example maps from the first window: the least local self head and most local cross head
    example = None
    wins = decode_windows(loaded, audio, 1)
    if wins:
        ws = {(k, layer): w for k, layer, w in attention_weights(loaded.model, wins[0], encoder=False)}
        nl = np.asarray(res["decoder_self"]["nonlocal"])
        ls, hs = np.unravel_index(nl.argmax(), nl.shape)
        lc_arr = np.asarray(res["decoder_cross"]["local"])
        lc, hc = np.unravel_index(lc_arr.argmax(), lc_arr.shape)
        c = max(wins[0].content_frames, 50)
        example = ((int(ls), int(hs), ws[("self", int(ls))][hs].float().cpu().numpy()),
                   (int(lc), int(hc), ws[("cross", int(lc))][hc, :, :c].float().cpu().numpy()))
    table = format_table(res)
    (out / "attention.txt").write_text(table + "\n", encoding="utf-8")
    (out / "attention.json").write_text(json.dumps(res, indent=1), encoding="utf-8")
    _heatmaps(res, example, out / "attention.png")
    res["table"] = table
    res["png"] = str(out / "attention.png")
    res["json"] = str(out / "attention.json")
    res["model"] = loaded.name
    res["audio"] = str(audio_path) if not isinstance(audio_path, np.ndarray) else "<array>"
    return res
