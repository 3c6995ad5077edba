"""KV policies (murmur.engine.kv.policies): kept positions exactly as specified, on a synthetic cache and on
the real tiny.en decoder with real speech."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from murmur.engine.kv.cache import KVCache
from murmur.errors import MurmurError
from murmur.engine.kv.policies import (Duo, OutputWindow, Policies, SpeechFollow, SpeechWindow,
                                       parse_kv_policy)

L, H, D, CTX, FR = 2, 2, 4, 448, 96


def _cache(policies, physical=True, rows=4, frames=FR):
    return KVCache(L, rows, H, D, CTX, frames, policy=Policies(policies, physical=physical))


def _load(cache, r, n_frames):
    # cross K/V whose first feature is the frame index: compaction must carry it along
    k = torch.zeros(1, H, n_frames, D)
    k[..., 0] = torch.arange(n_frames, dtype=torch.float32)
    cache.reset(r, r + 1)
    cache.load_cross(r, r + 1, [(k, k.clone()) for _ in range(L)])


def _forward(cache, start, stop, n_tokens, active=None):
    """What the decoder does to the cache for one forward, with K = V = logical position."""
    step = cache.prepare(start, stop, n_tokens, active)
    k = step.positions.float()[:, None, :, None].expand(-1, H, -1, D).contiguous()
    for layer in range(L):
        cache.write_self(layer, step, k, k)
    cache.commit(step)
    return step


def _kept_self(cache, r):
    """Logical positions the row keeps, read from the physical K values and keep bits."""
    n = int(cache.fill[r])
    vals = cache.k[:, r, :, :n, 0]  # [L, H, n]
    assert torch.equal(vals, vals[:1, :1].expand_as(vals)), "every layer/head holds the same slot order"
    keep = cache.self_keep[r, :n]
    return [int(v) for v, on in zip(vals[0, 0].tolist(), keep.tolist()) if on]


def _kept_cross(cache, r):
    n = int(cache.frames[r])
    vals = cache.xk[:, r, :, :n, 0]
    assert torch.equal(vals, vals[:1, :1].expand_as(vals))
    keep = cache.cross_keep[r, :n]
    assert not cache.cross_keep[r, n:].any()
    return [int(v) for v, on in zip(vals[0, 0].tolist(), keep.tolist()) if on]


@pytest.mark.parametrize("physical", [True, False])
def test_output_window_kept_positions_batch_of_rows(physical):
    sink, window, block = 3, 10, 4
    pol = OutputWindow(sink, window, block)
    cache = _cache([pol], physical)
    prompts = [2, 7, 20, 13]  # rows of different lengths, one prefilled past the window
    for r, n in enumerate(prompts):
        _load(cache, r, FR)
        _forward(cache, r, r + 1, n)
    active = np.array([True, True, False, True])  # a free slot in the middle computes, keeps nothing
    for step in range(40):
        act = None if step % 3 else active
        _forward(cache, 0, 4, 1, act)
        for r in range(4):
            pos = int(cache.pos[r])
            e = max(0, (pos - sink - window) // block * block)
            expect = list(range(min(sink, pos))) + list(range(sink + e, pos)) if pos > sink else list(range(pos))
            assert _kept_self(cache, r) == expect, (r, pos)
            kept_tail = pos - sink - e
            assert pos <= sink + window or window <= kept_tail < window + block
            if physical:
                assert cache.fill[r] == len(expect) <= pol.budget()
            else:
                assert cache.fill[r] == pos  # logical eviction: slots stay, bits go
    assert cache.pos[2] == 20 + 40 - 14  # the row was free in 14 of the 40 steps
    assert cache.stats["kv_self_evicted"] > 0


def test_output_window_keeps_attention_equal_physical_vs_logical():
    """Compaction moves K/V, positions stay: attention over the kept set is the same either way."""
    outs = []
    for physical in (True, False):
        cache = _cache([OutputWindow(2, 6, 4)], physical, rows=2)
        torch.manual_seed(0)
        for r in range(2):
            _load(cache, r, FR)
        res = []
        for n in range(30):
            step = cache.prepare(0, 2, 1)
            k = torch.randn(2, H, 1, D, generator=torch.Generator().manual_seed(n))
            q = torch.randn(2, H, 1, D, generator=torch.Generator().manual_seed(100 + n))
            kk, vv = cache.write_self(0, step, k, k * 2)
            for layer in range(1, L):
                cache.write_self(layer, step, k, k * 2)
            res.append(torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=step.self_mask))
            cache.commit(step)
        outs.append(torch.stack(res))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("physical", [True, False])
def test_speech_window_schedule(physical):
    sink, window, delay, rate, cap, block = 4, 20, 5, 3, 50, 8
    pol = SpeechWindow(sink, window, delay, rate, cap, block)
    cache = _cache([pol], physical)
    frames = [96, 60, 40, 96]
    prompts = [3, 1, 5, 9]
    for r in range(4):
        _load(cache, r, frames[r])
        _forward(cache, r, r + 1, prompts[r])
    for step in range(60):
        _forward(cache, 0, 4, 1)
        for r in range(4):
            steps = int(cache.pos[r]) - prompts[r]
            e = min(cap, rate * max(0, steps - delay), frames[r] - sink - window)
            e = max(0, e // block * block)
            expect = list(range(sink)) + list(range(sink + e, frames[r]))
            assert _kept_cross(cache, r) == expect, (r, steps)
            assert cache.frames[r] == (len(expect) if physical else frames[r])


@pytest.mark.parametrize("physical", [True, False])
def test_speech_follow_never_evicts_ahead_of_last_stamp(physical):
    sink, margin, block = 4, 6, 8
    cache = _cache([SpeechFollow(sink, margin, block)], physical)
    pol = cache.policy
    events = []
    pol.on_evict = lambda r, kind, gone, anchor: events.append((r, kind, gone, anchor))
    for r in range(4):
        _load(cache, r, FR)
        _forward(cache, r, r + 1, 3 + r)
    rng = np.random.default_rng(0)
    stamps = np.full(4, -1)
    for step in range(50):
        # rows emit timestamps at their own pace; a row may repeat or skip; -1 = none yet
        stamps = np.where(rng.random(4) < 0.4, np.minimum(stamps + rng.integers(1, 9, 4), FR), stamps)
        pol.observe_tokens(cache, list(range(4)), torch.from_numpy(stamps.copy()))
        _forward(cache, 0, 4, 1)
        for r in range(4):
            a = int(stamps[r])
            cut = max(0, (a - margin) // block * block) if a >= 0 else 0
            expect = list(range(sink)) + list(range(max(sink, cut), FR))
            assert _kept_cross(cache, r) == expect, (r, a)
            assert all(f in _kept_cross(cache, r) for f in range(max(a, 0), FR))
    assert events and all(kind == "cross" and (gone < anchor).all() for _, kind, gone, anchor in events)
    assert cache.stats["kv_cross_evicted_ahead"] == 0


def test_combined_policies_and_beam_gather():
    cache = _cache([OutputWindow(2, 8, 4), SpeechFollow(4, 0, 8)], physical=True)
    pol = cache.policy
    for r in range(4):
        _load(cache, r, FR)
        _forward(cache, r, r + 1, 5)
    stamps = torch.tensor([40, 10, 70, -1])
    pol.observe_tokens(cache, [0, 1, 2, 3], stamps)
    for _ in range(20):
        _forward(cache, 0, 4, 1)
    assert _kept_cross(cache, 0) == list(range(4)) + list(range(40, FR))
    assert _kept_cross(cache, 3) == list(range(FR))
    # beam search: row 1 takes row 2's state, cross included (its frames 10..39 are gone in row 2)
    cache.gather([1, 3], [2, 0])
    assert _kept_cross(cache, 1) == _kept_cross(cache, 2)
    assert _kept_self(cache, 1) == _kept_self(cache, 2)
    assert _kept_cross(cache, 3) == _kept_cross(cache, 0)
    _forward(cache, 0, 4, 1)  # and decoding goes on from the copied layouts
    assert _kept_self(cache, 1) == _kept_self(cache, 2)


def test_duo_per_head_masks():
    s_ret = np.array([[1, 0], [0, 1]], bool)
    c_ret = np.array([[0, 0], [1, 1]], bool)
    duo = Duo(s_ret, c_ret, duo_sink=2, duo_window=3, duo_cross_sink=1, duo_back=2, duo_ahead=5)
    cache = _cache([duo], rows=2, frames=40)
    for r in range(2):
        _load(cache, r, 40)
        _forward(cache, r, r + 1, 4 + 3 * r)
    cache.policy.observe_tokens(cache, [0, 1], torch.tensor([10, -1]))
    step = cache.prepare(0, 2, 1)
    assert len(step.self_masks) == L and step.self_masks[0].shape == (2, H, 1, step.length)
    for r in range(2):
        q = int(cache.pos[r])
        full = [j <= q for j in range(step.length)]
        local = [(j < 2 or q - 3 < j <= q) for j in range(step.length)]
        for layer in range(L):
            for h in range(H):
                want = full if s_ret[layer, h] else local
                assert step.self_masks[layer][r, h, 0].tolist() == want
        anchor = max([10, -1][r], 0)
        clocal = [(f < 1 or anchor - 2 <= f <= anchor + 5) for f in range(40)]
        for layer in range(L):
            for h in range(H):
                want = [True] * 40 if c_ret[layer, h] else clocal
                assert step.cross_masks[layer][r, h, 0].tolist() == want
    # the model reads step.self_mask / cross_mask: the cache swaps each layer's in
    k = torch.zeros(2, H, 1, D)
    cache.write_self(1, step, k, k)
    assert step.self_mask is step.self_masks[1]
    cache.cross(1, step)
    assert step.cross_mask is step.cross_masks[1]


def test_parse_kv_policy():
    assert parse_kv_policy("none", {}) is None
    p = parse_kv_policy("output-window+speech-follow", {"window": "32", "margin": "25", "physical": "0"})
    ow, sf = p.policies
    assert isinstance(ow, OutputWindow) and ow.window == 32 and ow.sink == 4
    assert isinstance(sf, SpeechFollow) and sf.margin == 25 and not p.physical
    for bad, opts in [("lru", {}), ("output-window", {"margin": "3"}), ("output-window", {"window": "x"}),
                      ("speech-window+speech-window", {})]:
        with pytest.raises(MurmurError):
            parse_kv_policy(bad, opts)
    duo = parse_kv_policy("duo", {"duo_retrieval": "0.25"}, model="tiny.en").policies[0]
    assert int(duo.self_ret.sum()) == 6 and int(duo.cross_ret.sum()) == 6  # 25 % of 4 x 6 heads
    # by default the map chooses: the shipped tiny.en map holds trained gates, retrieval >= 0.5
    from murmur.engine.duo import load_duo_map
    hm = load_duo_map("tiny.en")
    duo = parse_kv_policy("duo", {}, model="tiny.en").policies[0]
    assert duo.self_ret.tolist() == (np.asarray(hm["self_scores"]) >= 0.5).tolist()
    assert duo.cross_ret.tolist() == (np.asarray(hm["cross_scores"]) >= 0.5).tolist()
    duo = parse_kv_policy("duo", {"duo_threshold": "0.9"}, model="tiny.en").policies[0]
    assert duo.cross_ret.tolist() == (np.asarray(hm["cross_scores"]) >= 0.9).tolist()


def test_duo_gate_training_finds_local_self_attention(data_dir):
    """DuoAttention's gate optimisation on real speech (3 LibriSpeech utterances, 30 steps):
    the distillation loss stays small, and decoder self-attention, which is local (mostly the last
    32 tokens), gives up its full cache far sooner than cross-attention over the speech does."""
    from murmur.audio.decode import load_audio
    from murmur.eval.analyze import decode_windows
    from murmur.eval.duo_calibration import train_gates
    from murmur.models.loading import get_model

    loaded = get_model("tiny.en", compute_type="float32")
    files = sorted((data_dir / "librispeech_other_noref").rglob("*.flac"))[:3]
    wins = decode_windows(loaded, [load_audio(f) for f in files], 1)
    g_self, g_cross, log = train_gates(loaded, wins, steps=30, batch=3)
    assert g_self.shape == g_cross.shape == (4, 6)
    assert ((g_self >= 0) & (g_self <= 1)).all() and ((g_cross >= 0) & (g_cross <= 1)).all()
    assert g_self.mean() < 0.5 * g_cross.mean()
    assert max(log) < 0.05
    with pytest.raises(MurmurError, match="float32"):
        train_gates(get_model("tiny.en"), wins, steps=1)


# --- the real decoder on real speech -----------------------------------------------------------

@pytest.fixture(scope="module")
def clips(data_dir):
    from murmur.audio.decode import load_audio
    return {"jfk": load_audio(data_dir / "jfk" / "jfk.flac"),
            "lj": np.concatenate([load_audio(data_dir / "ljspeech" / f"LJ001-000{i}.flac") for i in (1, 2, 3)]),
            "ami": load_audio(data_dir / "ami" / "dev00.flac")}


def _tokens(t):
    return [tk for s in t.segments for tk in s.tokens]


def test_policy_none_bit_identical(tiny, clips):
    from murmur.transcribe import transcribe
    assert parse_kv_policy("none", {}) is None  # 'none' is the engine's policy-free path itself
    base = transcribe(clips["jfk"], tiny)
    # a policy that never evicts goes through every policy hook and still changes nothing
    noop = parse_kv_policy("output-window+speech-follow", {"window": "448", "margin": "1500"})
    t = transcribe(clips["jfk"], tiny, kv_policy=noop)
    assert _tokens(t) == _tokens(base)
    assert t.stats["kv_physical"] == t.stats["kv_attended"] == base.stats["kv_physical"]


def test_speech_follow_real_speech_batch(tiny, clips):
    """Rows of different lengths decode together; no evicted frame is at or ahead of its row's last
    emitted timestamp, and the transcript barely moves."""
    from murmur.eval.scoring import wer
    from murmur.transcribe import transcribe
    audio = np.concatenate([clips["ami"], np.zeros(16000, np.float32), clips["jfk"]])
    pol = parse_kv_policy("speech-follow", {"margin": "0", "speech_block": "16"})
    seen = []
    pol.on_evict = lambda r, kind, gone, anchor: seen.append((gone.max(), anchor))
    t = transcribe(audio, tiny, chunk_size=12, batch_size=4, kv_policy=pol, temperature=0.0)
    base = transcribe(audio, tiny, chunk_size=12, batch_size=4, temperature=0.0)
    assert t.stats["chunks"] > 2 and t.stats["mean_active_rows"] > 1.5
    assert seen and all(g < a for g, a in seen)
    assert t.stats["kv_cross_evicted"] > 0 and t.stats["kv_cross_evicted_ahead"] == 0
    assert t.stats["kv_physical"] < base.stats["kv_physical"]
    assert wer(base.text, t.text)["wer"] < 0.1  # margin 0 is the harshest setting


def test_physical_kv_bounded_on_long_full_chunk(tiny, clips):
    """A 90-s full-mode chunk (looped real speech): per-row physical KV stays within the budget.
    scripts/kv_bound.py runs the same check on 30 min."""
    from murmur.transcribe import transcribe
    audio = np.tile(np.concatenate([clips["lj"], clips["jfk"]]), 3)[: 90 * 16000]
    pol = parse_kv_policy("output-window+speech-window", {"sink": "4", "window": "32", "block": "16"})
    t = transcribe(audio, tiny, chunk_size=None, kv_policy=pol, temperature=0.0)
    ow = pol.policies[0]
    assert t.stats["windows"] >= 3
    assert t.stats["kv_physical_peak_per_row"] <= ow.budget() + 1500
    assert t.stats["kv_self_evicted"] > 0 and t.stats["kv_cross_evicted"] > 0
    assert t.stats["kv_physical"] < t.stats["kv_logical"]
    assert len(t.text.split()) > 100


def test_analyze_attention_on_jfk(tiny, jfk_path, tmp_path):
    """`murmur analyze attention`: per-head locality tables and the files, on real speech."""
    from murmur.eval.analyze import analyze_attention
    res = analyze_attention(jfk_path, tiny, out_dir=tmp_path, max_windows=1)
    d = tiny.model.dims
    local = np.asarray(res["decoder_cross"]["local"])
    assert local.shape == (d.n_text_layer, d.n_text_head) and 0 <= local.min() and local.max() <= 1
    # heads differ: some follow the audio near the last timestamp (speech-follow), some look far
    # away (DuoAttention's retrieval heads)
    assert local.max() > 0.7 and local.min() < 0.3
    for name in ("attention.txt", "attention.json", "attention.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_paused_rows_keep_their_cache_through_a_focus_step():
    cache = KVCache(L, 3, H, D, CTX, FR)
    for r in range(3):
        _load(cache, r, FR)
    _forward(cache, 0, 3, 5)
    before = (cache.fill.copy(), cache.self_keep.clone(), cache.k[:, :, :, :5].clone())
    with cache.pausing(np.array([False, True, False])):
        step = _forward(cache, 0, 3, 1, active=np.array([True, False, True]))
    assert cache.paused is None
    assert step.slots[1, 0] == 5  # the paused row computed into its next slot...
    assert cache.fill.tolist() == [6, 5, 6]
    assert torch.equal(cache.self_keep[1], before[1][1])  # ...and kept nothing
    assert torch.equal(cache.k[:, 1, :, :5], before[2][:, 1])
    assert cache.self_keep[0, 5] and cache.self_keep[2, 5]
