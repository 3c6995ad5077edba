"""Multi-token prediction: Medusa-style heads on the decoder's last hidden state draft the next tokens.

Head i (1..k) maps the final hidden state h that chose a row's pending token to h + SiLU(W_i h + b_i)
and scores it with the model's own token embedding (the shared unembedding), so it guesses the token
i places after the pending one. To keep that read small on CPU the heads score a vocabulary subset:
every token the training decodes produced, the first `TOP_IDS` ids of the BPE (merge order follows
frequency), the timestamps and end-of-text. The engine verifies the guesses (murmur.spec.speculator),
so the output is the model's own. (The paper's threshold mode, which takes confident guesses
unverified, is not built: the heads trained on the audio at hand are right too rarely, below.)

Heads are trained by self-distillation on the model's greedy decodes (murmur.eval.mtp_training,
`murmur train-mtp`) and ship in murmur/data/mtp_<model>.pt; a retrained file goes to
$MURMUR_CACHE/mtp_<model>.pt and takes precedence. The hidden state comes from a forward hook on
the decoder's final layer norm, so the model code does not change.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import torch
from torch import Tensor, nn

from murmur.errors import ModelError
from murmur.paths import model_files
from murmur.spec.base import Draft, DraftSource

TOP_IDS = 4096


def user_heads_path(model_name: str) -> Path:
    return model_files("mtp", model_name, "pt")[0]


def shipped_heads_path(model_name: str) -> Path:
    return model_files("mtp", model_name, "pt")[1]


class MTPHeads(nn.Module):
    """k residual heads over a vocabulary subset `vocab` (token ids), scored by `embed` [V', C]."""

    def __init__(self, k: int, width: int, vocab: Tensor, embed: Tensor):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(width, width) for _ in range(k))
        for p in self.proj:  # zero: every head starts as the model's own next-token head
            nn.init.zeros_(p.weight), nn.init.zeros_(p.bias)
        self.register_buffer("vocab", vocab.long())
        self.register_buffer("embed", embed.float())

    @property
    def k(self) -> int:
        return len(self.proj)

    def forward(self, h: Tensor) -> Tensor:
        """h [R, C] -> logits [R, k, V'] over the subset."""
        h = h.float()
        x = torch.stack([h + nn.functional.silu(p(h)) for p in self.proj], dim=1)
        return x @ self.embed.T

    def state(self, model_name: str, made: str) -> dict:
        return {"model": model_name, "made": made, "k": self.k, "width": self.embed.shape[1],
                "vocab": self.vocab.to(torch.int32),
                "proj": {n: t.half() for n, t in self.proj.state_dict().items()}}


def vocab_subset(seen, timestamp_begin: int, n_vocab: int, eot: int) -> Tensor:
    ids = set(int(t) for t in seen) | set(range(min(TOP_IDS, timestamp_begin))) | {eot}
    ids |= set(range(timestamp_begin, n_vocab))
    return torch.tensor(sorted(i for i in ids if 0 <= i < n_vocab), dtype=torch.long)


def load_heads(loaded, path: str | os.PathLike | None = None) -> MTPHeads:
    """The heads of `loaded`: `path`, else the user's retrained file, else the shipped one."""
    name = loaded.name
    cands = [Path(path)] if path else [user_heads_path(name), shipped_heads_path(name)]
    for p in cands:
        if p.is_file():
            try:
                st = torch.load(p, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - a corrupt file is the user's to fix
                raise ModelError(f"MTP heads {p} are unreadable: {e}") from None
            emb = loaded.model.decoder.token_embedding.weight.detach()
            if st.get("width") != emb.shape[1] or int(st["vocab"].max()) >= emb.shape[0]:
                raise ModelError(f"MTP heads {p} were trained for another model than {name!r}")
            heads = MTPHeads(int(st["k"]), emb.shape[1], st["vocab"].long(), emb[st["vocab"].long()])
            heads.proj.load_state_dict({n: t.float() for n, t in st["proj"].items()})
            heads.path = str(p)
            return heads.eval().to(emb.device)
    raise ModelError(f"no MTP heads for model {name!r} (looked in {', '.join(map(str, cands))}); "
                     f"train them with `murmur train-mtp --model {name}`")


class _Hidden:
    """The decoder's final hidden states of the last forward, per thread (engines of one model may
    run on several threads): a forward hook on its final layer norm, installed once per model, that
    keeps them only on threads whose engine drafts with MTP (others see no change at all)."""
    _lock = threading.Lock()

    def __init__(self):
        self.local = threading.local()

    def __call__(self, module, args, out):
        if getattr(self.local, "on", False):
            self.local.x = out

    def watch(self) -> None:
        self.local.on = True

    def take(self):
        x, self.local.x = getattr(self.local, "x", None), None
        return x

    @classmethod
    def of(cls, decoder) -> "_Hidden":
        with cls._lock:
            h = getattr(decoder, "_mtp_hidden", None)
            if h is None:
                h = decoder._mtp_hidden = cls()
                decoder.ln.register_forward_hook(h)
            return h


class MTP(DraftSource):
    """Drafts from the heads: after each verify forward, each row's next k guesses."""
    name = "mtp"

    def __init__(self, heads: MTPHeads, decoder):
        self.heads = heads
        self.hidden = _Hidden.of(decoder)
        self.drafts: dict[int, list[int]] = {}

    def admit(self, engine, act) -> None:
        self.hidden.watch()  # admit runs on the engine's thread, as its forwards do
        self.hidden.take()  # the prefill's states: no draft from them (its positions differ)
        for r in act.rows:
            self.drafts.pop(r, None)

    def propose(self, engine, act, j, row, k):
        d = self.drafts.get(row)
        return Draft(d[:k]) if d else None

    @torch.inference_mode()
    def after_forward(self, engine, hi: int, index) -> None:
        x = self.hidden.take()
        if x is None or x.dim() != 3 or x.shape[0] < hi:
            self.drafts.clear()
            return
        at = torch.as_tensor(index, dtype=torch.long, device=x.device)
        h = x[torch.arange(hi, device=x.device), at]
        best = self.heads(h).argmax(dim=-1)  # [hi, k]
        toks = self.heads.vocab[best].tolist()
        self.drafts = {r: toks[r] for r in range(hi)}

    def describe(self) -> str:
        return f"mtp(k={self.heads.k})"
