"""A/B in one process: the stitched set with the bf16 matmul attention paths (encoder and speech K/V)
against SDPA with fp32 speech K/V, alternating, twice. Run it on a CPU whose plan picks "matmul"
(AVX512-BF16 without AMX): python scripts/speech_attention_ab.py [CHUNK_SIZE]"""
import sys
import time

import torch

import murmur
from murmur import TranscribeOptions
from murmur.eval import scoring
from murmur.eval.bench import dataset

item = dataset.stitched()
m = murmur.load_model("tiny.en")
cs = sys.argv[1] if len(sys.argv) > 1 else "30"
o = TranscribeOptions(chunk_size=int(cs) if cs.isdigit() else cs)


def use(matmul: bool) -> None:
    m.model.encoder.attention = m.model.decoder.speech_attention = "matmul" if matmul else "sdpa"
    m.cross_dtype = torch.bfloat16 if matmul else torch.float32


murmur.transcribe(item.audio[:16000 * 60], m, options=o)  # warm-up
for _ in range(2):
    for matmul in (False, True):
        use(matmul)
        t = time.perf_counter()
        r = murmur.transcribe(item.audio, m, options=o)
        s = r.stats
        print(f"{'matmul bf16' if matmul else 'sdpa fp32  '} wall {time.perf_counter() - t:.2f} s "
              f"encode {s['encode_s']:.2f} decode {s['decode_s']:.2f} tokens {s['tokens']} "
              f"WER {scoring.wer(item.reference, r.text)['wer'] * 100:.2f} %", flush=True)
