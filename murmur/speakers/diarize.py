"""Speaker diarization: who spoke when, with one speaker map for the whole recording.

Speech regions (Silero VAD) -> 1.5 s sliding windows -> GE2E speaker embeddings (Resemblyzer's
bundled `pretrained.pt`, run here directly) -> agglomerative clustering over ALL windows at once
(cosine, average linkage, calibrated threshold; scripts/calibrate_diarization.py) -> frame-level
resegmentation against the cluster centroids -> overlap: where the segmentation model
(murmur.speakers.segmentation) counts two voices, the runner-up centroid too -> Turns.

We do not `import resemblyzer`: its __init__ pulls in webrtcvad (which needs the removed
pkg_resources) and librosa (slow import). We only need its weights file and its mel recipe,
both reproduced here; nothing is downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from murmur.cpu import native_bf16
from murmur.errors import AudioError
from murmur.threads import idle_cores, torch_threads
from murmur.types import Segment, Turn

SR = 16000
HOP = 160  # 10 ms mel hop, as the encoder was trained
FPS = SR // HOP


@dataclass
class DiarizeOptions:
    window: float = 1.5  # seconds per embedding window
    hop: float = 0.75  # seconds between windows
    min_window: float = 0.5  # shorter windows (short regions) only vote in resegmentation
    threshold: float = 0.35  # cosine distance where clusters stop merging (calibrated on AMI)
    linkage: str = "average"
    step: float = 0.1  # resegmentation frame, seconds
    smooth: float = 0.5  # moving-average width over frame scores before labelling, seconds
    min_cluster: int = 2  # clusters with fewer windows are not speakers (unless num_speakers)
    # label a second speaker (the runner-up centroid) where the segmentation model counts two
    # (murmur.speakers.segmentation); on the AMI clips pooled DER 30.7 -> 24.4 %. A runner-up gated by its
    # score alone traded missed overlap for as much false alarm (pooled DER -1 point).
    overlap: bool = True
    overlap_step: float = 5.0  # seconds between its 10 s windows: 2.5 gave the same DER at 2x time
    overlap_min: float = 1.5  # a frame is overlapped where the mean count reaches this
    # torch intra-op threads while embedding and counting voices (process-wide, restored after).
    # Their LSTMs' per-step matmuls are small: with one of 2 cores busy, 2 threads ran 3.4x (GE2E)
    # and 2.6-10x (segmentation) slower than 1, while on idle cores they save a third. "auto": as
    # many as the process has and the machine leaves idle (a 50 ms look at every core's load);
    # None keeps the process setting.
    threads: int | str | None = "auto"
    bf16: bool | None = None  # LSTM in bfloat16; None: where the CPU has it natively (embed_windows)
    vad: object = None  # murmur.audio.vad.VadOptions for the default regions; None: vad.meeting_options()


# --- GE2E speaker encoder (Resemblyzer) -------------------------------------------------------

class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(40, 256, 3, batch_first=True)
        self.linear = nn.Linear(256, 256)

    def forward(self, packed) -> torch.Tensor:
        _, (h, _) = self.lstm(packed)  # h[-1]: last layer's state at each sequence's true end
        e = torch.relu(self.linear(h[-1]))
        return e / e.norm(dim=1, keepdim=True).clamp_min(1e-8)


_ENCODER: _Encoder | None = None
_BATCH = 256  # windows per LSTM call


def load_encoder() -> _Encoder:
    global _ENCODER
    if _ENCODER is None:
        from murmur.models.common import load_checkpoint, package_file

        # not `import resemblyzer`: see the module docstring
        path = package_file("resemblyzer", "pretrained.pt", need="speaker diarization")
        state = load_checkpoint(path, "model_state", "speaker encoder")
        enc = _Encoder()
        # the checkpoint also holds GE2E loss parameters (similarity_weight/bias) we do not need
        enc.load_state_dict({k: v for k, v in state.items() if k.startswith(("lstm.", "linear."))})
        _ENCODER = enc.eval()
    return _ENCODER


def _mel_filters(n_fft: int = 400, n_mels: int = 40) -> np.ndarray:
    """librosa.filters.mel(sr=16000, n_fft=400, n_mels=40): Slaney scale, area-normalised."""
    f_sp, min_hz = 200.0 / 3, 1000.0
    min_mel, logstep = min_hz / f_sp, np.log(6.4) / 27.0

    def hz2mel(f):
        f = np.asarray(f, dtype=np.float64)
        return np.where(f >= min_hz, min_mel + np.log(np.maximum(f, min_hz) / min_hz) / logstep,
                        f / f_sp)

    def mel2hz(m):
        return np.where(m >= min_mel, min_hz * np.exp(logstep * (m - min_mel)), f_sp * m)

    fft_f = np.linspace(0, SR / 2, n_fft // 2 + 1)
    mel_f = mel2hz(np.linspace(hz2mel(0.0), hz2mel(SR / 2), n_mels + 2))
    ramps = mel_f[:, None] - fft_f[None, :]
    fdiff = np.diff(mel_f)[:, None]
    w = np.maximum(0, np.minimum(-ramps[:-2] / fdiff[:-1], ramps[2:] / fdiff[1:]))
    return (w * (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]).astype(np.float32)


def mel_frames(audio: np.ndarray) -> torch.Tensor:
    """Power mel spectrogram (frames, 40) exactly as resemblyzer.audio.wav_to_mel_spectrogram,
    after its volume normalisation (raise to -30 dBFS, never lower): the encoder reads linear
    power, so loudness matters to it."""
    a = np.asarray(audio, dtype=np.float32)
    # loudness: float32 dot products over 4 s blocks, summed in float64 (one float32 sum over
    # hours of samples would lose its digits)
    ms = sum(float(np.dot(b, b)) for b in np.split(a, range(1 << 16, len(a), 1 << 16)))
    ms = ms / len(a) if len(a) else 0.0
    gain = 10 ** ((-30 - 10 * np.log10(ms)) / 20) if 0 < ms < 10 ** (-30 / 10) else 1.0
    # centred frames (400 samples, zero padding at the ends), a block of frames at a time: the
    # whole file's complex spectrogram is 10 bytes a sample (145 MB for 15 min), and copies of
    # the audio are made a block at a time (callers may pass read-only or memory-mapped arrays)
    n = 1 + len(a) // HOP
    fb, win = torch.from_numpy(_mel_filters()).T.contiguous(), torch.hann_window(400)
    out = torch.empty(n, fb.shape[1])
    for f0 in range(0, n, _MEL_BLOCK):
        f1 = min(n, f0 + _MEL_BLOCK)
        lo, hi = f0 * HOP - 200, (f1 - 1) * HOP + 200
        x = np.zeros(hi - lo, np.float32)
        x[max(0, -lo):max(0, -lo) + len(a[max(0, lo):hi])] = a[max(0, lo):hi]
        if gain != 1.0:
            x *= gain
        s = torch.stft(torch.from_numpy(x), 400, HOP, window=win, center=False, return_complex=True)
        torch.mm((s.real.square() + s.imag.square()).T, fb, out=out[f0:f1])
    return out


_MEL_BLOCK = 4096  # frames (41 s) per STFT block


# --- pipeline ---------------------------------------------------------------------------------

def _spans(regions, n_frames: int, opts: DiarizeOptions) -> list[tuple[int, int]]:
    """Embedding windows (mel frame spans) inside speech regions. Regions longer than a window get
    evenly spread full windows covering them end to end; shorter ones one window of their own
    length, rounded down to 10 frames so that equal lengths batch together."""
    win, hop = round(opts.window * FPS), round(opts.hop * FPS)
    out = []
    for s, e in regions:
        a, b = max(0, round(s * FPS)), min(n_frames, round(e * FPS))
        n = b - a
        if n >= win:
            k = int(np.ceil((n - win) / hop)) + 1
            out += [(a + o, a + o + win) for o in np.linspace(0, n - win, k).round().astype(int)]
        elif n >= 20:
            m = n // 10 * 10
            a += (n - m) // 2
            out.append((a, a + m))
    return out


def embed_windows(mel: torch.Tensor, spans: list[tuple[int, int]], threads: int | str | None = 1,
                  bf16: bool | None = None) -> np.ndarray:
    """L2-normalised GE2E embeddings (n, 256) of mel[start:end] for each (start, end) span.
    threads: as DiarizeOptions.threads. bf16: run the LSTM in bfloat16 (None: where the CPU does
    bf16 in hardware; never elsewhere). It was 3x faster on such a CPU, cosine to the float32 embeddings >= 0.996,
    and the same AMI scores."""
    if threads == "auto":
        threads = idle_threads()
    # plain batches of equal length: packed sequences miss oneDNN and ran ~4x slower
    enc = load_encoder()
    # bf16 only where the CPU has it: elsewhere oneDNN has no bf16 LSTM kernel at all
    bf16 = native_bf16() if bf16 is None else bool(bf16) and native_bf16()
    emb = np.zeros((len(spans), 256), np.float32)
    by_len: dict[int, list[int]] = {}
    for i, (a, b) in enumerate(spans):
        by_len.setdefault(b - a, []).append(i)
    with torch_threads(threads), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                                  enabled=bf16):
        for idx in by_len.values():
            for j in range(0, len(idx), _BATCH):
                part = idx[j:j + _BATCH]
                x = torch.stack([mel[spans[i][0]:spans[i][1]] for i in part])
                e = enc(x).float()
                emb[part] = (e / e.norm(dim=1, keepdim=True).clamp_min(1e-8)).numpy()
    return emb


# windows the agglomerative clustering takes at once: it keeps every pair's distance (float64),
# 144 MB at 6000 (about 75 min of speech) but 6.4 GB at 40000 (10 h)
MAX_CLUSTER_WINDOWS = 6000


def _cluster(emb: np.ndarray, opts: DiarizeOptions, num: int | None, lo: int, hi: int | None
             ) -> np.ndarray:
    """_cluster_all on every window, or, past MAX_CLUSTER_WINDOWS, on an evenly spaced sample of
    them, the others then taking the speaker whose centroid is nearest (still one speaker map
    for the whole recording; a speaker with very little speech may be missed)."""
    n = len(emb)
    if n <= MAX_CLUSTER_WINDOWS:
        return _cluster_all(emb, opts, num, lo, hi)
    pick = np.linspace(0, n - 1, MAX_CLUSTER_WINDOWS).round().astype(int)
    sub = _cluster_all(emb[pick], opts, num, lo, hi)  # speakers 0..k-1 (at least one), else -1
    cents = np.stack([emb[pick][sub == k].mean(0) for k in range(sub.max() + 1)])
    labels = (emb @ cents.T).argmax(1)
    labels[pick] = sub
    return labels


def _cluster_all(emb: np.ndarray, opts: DiarizeOptions, num: int | None, lo: int, hi: int | None
                 ) -> np.ndarray:
    """Agglomerative clustering of all windows at once. Speakers are the clusters of at least
    opts.min_cluster windows; the rest get -1 (the resegmentation gives their speech to the nearest
    speaker). The count comes from num_speakers, else from the distance threshold, clamped to
    [lo, hi]; a forced count cuts the tree finer until it has that many such clusters, so a lone
    outlier window cannot take a speaker's place."""
    n = len(emb)
    if n < 2:
        return np.zeros(n, int)
    from scipy.cluster.hierarchy import fcluster, linkage

    z = linkage(emb, method=opts.linkage, metric="cosine")

    def speakers(labels, k):
        # tiny clusters are mostly coughs, laughter and crosstalk, not speakers
        sizes = np.bincount(labels)
        big = [c for c in np.argsort(-sizes, kind="stable") if sizes[c] >= opts.min_cluster][:k]
        ids = np.full(len(sizes), -1)
        ids[big] = np.arange(len(big))
        return ids[labels], len(big)

    labels, found = speakers(fcluster(z, opts.threshold, "distance") - 1, n)
    want = min(num or int(np.clip(max(found, 1), lo, hi or n)), n)
    if found == want:
        return labels
    for m in range(want, n + 1):
        labels, found = speakers(fcluster(z, m, "maxclust") - 1, want)
        if found == want:
            return labels
    return fcluster(z, want, "maxclust") - 1  # too few windows for min_cluster: all count


def _frame_scores(spans, sims: np.ndarray, n_steps: int, ratio: float) -> np.ndarray:
    """Mean window-to-centroid similarity over the windows covering each resegmentation step
    (difference arrays: O(steps + windows)). Steps no window covers get NaN."""
    acc = np.zeros((n_steps + 1, sims.shape[1]))
    cnt = np.zeros(n_steps + 1)
    for (a, b), s in zip(spans, sims):
        i, j = int(a / ratio), max(int(a / ratio) + 1, int(np.ceil(b / ratio)))
        acc[i] += s
        acc[min(j, n_steps)] -= s
        cnt[i] += 1
        cnt[min(j, n_steps)] -= 1
    acc, cnt = np.cumsum(acc, 0)[:-1], np.cumsum(cnt)[:-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return acc / cnt[:, None]


def diarize(audio: np.ndarray, sr: int = SR, *, num_speakers: int | None = None,
            min_speakers: int = 1, max_speakers: int | None = None,
            regions: list[tuple[float, float]] | None = None,
            options: DiarizeOptions | None = None) -> list[Turn]:
    """Speaker turns for a whole recording, sorted by start; speakers are named SPEAKER_00,
    SPEAKER_01, ... in order of first appearance, one map for the whole recording.

    audio: mono samples (float in [-1, 1], or integer PCM) at `sr` Hz; resampled to 16 kHz.
    num_speakers: the exact count if known (1 skips embedding altogether); otherwise the count is
        estimated by the clustering threshold and clamped to [min_speakers, max_speakers].
    regions: speech regions in seconds, e.g. the transcriber's VAD output, to skip a second VAD
        pass; default: murmur.audio.vad.speech_regions with options.vad.
    Turns of different speakers overlap where options.overlap finds two at once. No speech
    gives [].
    """
    opts = options or DiarizeOptions()
    if num_speakers is not None and num_speakers < 1:
        raise ValueError(f"num_speakers must be >= 1, got {num_speakers}")
    if max_speakers is not None and max_speakers < max(1, min_speakers):
        raise ValueError(f"max_speakers ({max_speakers}) < min_speakers ({min_speakers})")
    audio = np.asarray(audio)
    if np.issubdtype(audio.dtype, np.integer):
        audio = audio / np.iinfo(audio.dtype).max
    audio = audio.astype(np.float32, copy=False)
    if audio.ndim != 1:
        raise AudioError(f"diarize needs mono audio, got shape {audio.shape}")
    if sr != SR:
        from scipy.signal import resample_poly

        audio = resample_poly(audio, SR, sr).astype(np.float32)
    dur = len(audio) / SR
    if regions is None:
        from murmur.audio.vad import meeting_options, speech_regions

        regions = speech_regions(audio, SR, opts.vad or meeting_options())
    regions = _join([(max(0.0, s), min(dur, e)) for s, e in regions if min(dur, e) > max(0.0, s)])
    if not regions:
        return []
    if num_speakers == 1 or max_speakers == 1:
        return _to_turns([(s, e, 0) for s, e in regions])

    mel = mel_frames(audio)
    spans = _spans(regions, len(mel), opts)
    if not spans:  # only blips too short to embed: one speaker is all we can say
        return _to_turns([(s, e, 0) for s, e in regions])
    threads = idle_threads() if opts.threads == "auto" else opts.threads
    emb = embed_windows(mel, spans, threads, opts.bf16)

    def counts(changes):
        from murmur.speakers.segmentation import speaker_counts

        return speaker_counts(audio, regions, opts.overlap_step, opts.bf16, changes, threads)
    return _label(regions, spans, emb, len(mel), opts, num_speakers, min_speakers, max_speakers,
                  counts=counts if opts.overlap else None)


def idle_threads() -> int:
    """Threads for the diarizer's LSTMs: the process's torch threads, capped at the cores other
    programs leave idle (a fresh look: the transcription may have run for minutes)."""
    n = torch.get_num_threads()
    return 1 if n < 2 else max(1, min(n, idle_cores(every=0.0)))


def _join(regions) -> list[tuple[float, float]]:
    """Sorted regions with touching ones joined: Silero's padded regions can touch, and the
    chunker joins them, so the transcriber's regions and our own VAD pass give the same windows."""
    out: list[list[float]] = []
    for s, e in sorted(regions):
        if out and s - out[-1][1] < 1e-3:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def _label(regions, spans, emb, n_frames, opts, num=None, lo=1, hi=None, counts=None
           ) -> list[Turn]:
    """Cluster window embeddings, then resegment speech against the centroids. counts: None, or
    a function of the speaker changes giving segmentation.speaker_counts, called only if there
    are 2+ speakers."""
    strong = np.array([b - a >= opts.min_window * FPS for a, b in spans])
    if not strong.any():
        strong[:] = True
    labels = _cluster(emb[strong], opts, num, lo, hi)
    ks = [k for k in range(labels.max() + 1) if (labels == k).any()]
    cents = np.stack([emb[strong][labels == k].mean(0) for k in ks])
    cents /= np.linalg.norm(cents, axis=1, keepdims=True)

    # resegmentation: every step (opts.step) of speech takes the centroid its covering windows
    # resemble most, smoothed over opts.smooth so labels do not flicker between steps
    from scipy.ndimage import uniform_filter1d

    ratio = opts.step * FPS  # mel frames per step
    n_steps = int(np.ceil(n_frames / ratio))
    scores = _frame_scores(spans, emb @ cents.T, n_steps, ratio)
    width = max(1, round(opts.smooth / opts.step))
    pieces, tops = [], []
    for s, e in regions:
        i = min(int(s / opts.step), n_steps - 1)
        j = min(n_steps, max(i + 1, int(np.ceil(e / opts.step))))
        sc = scores[i:j]
        ok = ~np.isnan(sc[:, 0])
        if not ok.any():  # region without a window of its own: borrow the nearest window's
            mid = (s + e) / 2 * FPS
            w = int(np.argmin([abs((a + b) / 2 - mid) for a, b in spans]))
            sc = np.tile(emb[w] @ cents.T, (j - i, 1))
        elif not ok.all():  # edges the rounded spans miss: copy the nearest covered step
            idx = np.flatnonzero(ok)
            sc = sc[idx[np.abs(np.arange(j - i)[:, None] - idx[None]).argmin(1)]]
        sm = uniform_filter1d(sc, width, axis=0, mode="nearest")
        top = np.argsort(-sm, axis=1)[:, :2]
        pieces += _runs(top[:, 0], s, e, i * opts.step, opts.step)
        tops.append((s, e, i, top))
    if counts is None or len(ks) < 2:
        return _to_turns(pieces)

    # overlap: where the segmentation model counts two voices, the runner-up centroid is the
    # second. Only windows where the primary labels change speaker are run: a voice never on
    # top inside 10 s can only be a short interjection, and a monologue costs nothing.
    from murmur.speakers.segmentation import FRAME_DUR, FRAME_STEP

    steps = np.concatenate([i + np.arange(len(top)) for _, _, i, top in tops])
    first = np.concatenate([top[:, 0] for *_, top in tops])
    change = np.flatnonzero(first[1:] != first[:-1])
    c = counts([(steps[q] * opts.step, (steps[q + 1] + 1) * opts.step) for q in change])
    at = ((np.arange(n_steps) + 0.5) * opts.step - FRAME_DUR / 2) / FRAME_STEP
    two = c[np.clip(np.rint(at).astype(int), 0, len(c) - 1)] >= opts.overlap_min
    for s, e, i, top in tops:
        pieces += [p for p in _runs(np.where(two[i:i + len(top)], top[:, 1], -1), s, e,
                                    i * opts.step, opts.step) if p[2] >= 0]
    return _to_turns(pieces)


def _runs(lab: np.ndarray, s: float, e: float, t0: float, step: float):
    """(start, end, label) runs of per-step labels, clipped to the region [s, e]."""
    cuts = np.flatnonzero(np.diff(lab)) + 1
    bounds = [s] + [min(e, max(s, t0 + c * step)) for c in cuts] + [e]
    return [(bounds[q], bounds[q + 1], int(lab[c])) for q, c in enumerate([0, *cuts])]


def _to_turns(pieces) -> list[Turn]:
    """Merge touching same-label pieces, name speakers by first appearance."""
    merged: list[list] = []
    last: dict[int, list] = {}  # per label, since overlap pieces interleave
    for s, e, k in sorted(pieces):
        m = last.get(k)
        if m is not None and s - m[1] < 1e-6:
            m[1] = max(m[1], e)
        elif e > s:
            last[k] = [s, e, k]
            merged.append(last[k])
    names: dict[int, str] = {}
    for m in merged:
        names.setdefault(m[2], f"SPEAKER_{len(names):02d}")
    return [Turn(float(s), float(e), names[k]) for s, e, k in merged]


# --- speakers onto transcript segments ------------------------------------------------------

def assign_speakers(segments: list[Segment], turns: list[Turn]) -> list[Segment]:
    """Label words and segments with speakers. A word takes the speaker whose turns overlap its
    span most (the nearest turn if none does); a segment with words is split where its words'
    speaker changes (text rebuilt from the words, times from the words); a segment without
    words takes the speaker of most overlap. Returns new Segments; the inputs are not changed."""
    if not turns:
        return list(segments)
    order = sorted(turns, key=lambda t: t.start)
    ts = np.array([t.start for t in order])
    te = np.array([t.end for t in order])
    names = sorted({t.speaker for t in order})
    tk = np.array([names.index(t.speaker) for t in order])
    reach = np.maximum.accumulate(te)  # turns before the first reach > x all end by x

    def who(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        lo = int(np.searchsorted(reach, starts.min(), "right"))
        hi = int(np.searchsorted(ts, ends.max(), "left"))
        ov = np.clip(np.minimum(ends[:, None], te[None, lo:hi])
                     - np.maximum(starts[:, None], ts[None, lo:hi]), 0, None)
        per = np.zeros((len(starts), len(names)))
        np.add.at(per.T, tk[lo:hi], ov.T)
        out = per.argmax(1)
        for i in np.flatnonzero(per.max(1) <= 0):  # nothing overlaps: nearest turn
            gap = np.maximum(ts - ends[i], starts[i] - te)
            out[i] = tk[int(gap.argmin())]
        return out

    out: list[Segment] = []
    for seg in segments:
        if not seg.words:
            k = who(np.array([seg.start]), np.array([max(seg.end, seg.start)]))[0]
            out.append(replace(seg, speaker=names[k]))
            continue
        ks = who(np.array([w.start for w in seg.words]), np.array([w.end for w in seg.words]))
        words = [replace(w, speaker=names[k]) for w, k in zip(seg.words, ks)]
        cuts = [0, *(np.flatnonzero(np.diff(ks)) + 1), len(words)]
        if len(cuts) == 2:
            out.append(replace(seg, speaker=words[0].speaker, words=words))
            continue
        for a, b in zip(cuts[:-1], cuts[1:]):
            part = words[a:b]
            # the tokens and decoding scores describe the whole segment, not this piece
            out.append(replace(seg, start=part[0].start, end=part[-1].end, speaker=part[0].speaker,
                               text="".join(w.word for w in part), words=part, tokens=[]))
    return out
