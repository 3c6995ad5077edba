"""TranscribeOptions: the defaults transcribe() always had, one clear error per bad setting, strings
as HTTP forms and manifests give them, and the same transcript from keywords and from the object."""
import numpy as np
import pytest

import murmur
from murmur import DecodingOptions, OptionsError, TranscribeOptions
from murmur.audio.decode import load_audio


def test_defaults_are_transcribes():
    o = TranscribeOptions()
    assert (o.chunk_size, o.batch_size, o.beam_size, o.seed, o.compute_type) == (30, 16, 1, 0, "auto")
    assert not (o.diarize or o.word_timestamps or o.progress)
    assert o.decoding_options() == DecodingOptions()  # the fields left at None change nothing


def test_fields_override_the_decoding_rules():
    base = DecodingOptions(language="de", initial_prompt="a", logprob_threshold=None)
    d = TranscribeOptions(decoding=base, temperature=0, beam_size=5, initial_prompt="b").decoding_options()
    assert (d.language, d.temperature, d.beam_size, d.initial_prompt, d.logprob_threshold) == \
        ("de", (0.0,), 5, "b", None)
    # DecodingOptions fields given as keywords go into `decoding`
    o = TranscribeOptions().with_(no_speech_threshold=None, chunk_size="full")
    assert o.chunk_size is None and o.decoding.no_speech_threshold is None
    with pytest.raises(TypeError, match="bogus"):
        TranscribeOptions().with_(bogus=1)


@pytest.mark.parametrize("kw, message", [
    (dict(chunk_size="45"), "invalid chunk size"),
    (dict(chunk_size=0), "chunk_size 0: must be above 0"),
    (dict(batch_size=0), "batch_size 0: must be at least 1"),
    (dict(batch_size=2.5), "batch_size: expected an integer"),
    (dict(beam_size=True), "beam_size: expected an integer"),
    (dict(min_speakers=3, max_speakers=2), "max_speakers 2: must be at least 3"),
    (dict(temperature=-0.1), "temperature -0.1: must be at least 0"),
    (dict(temperature=()), "temperature: give at least one value"),
    (dict(task="summarise"), "task 'summarise'"),
    (dict(language="english"), "language 'english'"),
    (dict(compute_type="int4"), "compute type 'int4'"),
    (dict(kv_policy="speech-windw"), "unknown KV policy 'speech-windw'"),
    (dict(kv_policy="output-window", kv_opts={"margin": "3"}), "does not apply"),
    (dict(kv_policy="output-window", kv_opts=["sink"]), "expected KEY=VALUE"),
    (dict(kv_policy="output-window", kv_opts={"sink": "x"}), "expected an integer"),
    (dict(encoder_sparsity="half"), "LAYER:FRACTION"),
    (dict(diarize="yes"), "diarize: expected true or false"),
])
def test_bad_settings_say_what_is_wrong(kw, message):
    with pytest.raises(OptionsError, match=message):
        TranscribeOptions(**kw)
    assert issubclass(OptionsError, murmur.MurmurError) and issubclass(OptionsError, ValueError)


def test_from_mapping_parses_strings():
    o = TranscribeOptions.from_mapping({
        "chunk-size": "full", "batch_size": "8", "diarize": "true", "word_timestamps": "0",
        "temperature": "0,0.2,0.4", "num_speakers": "none", "max_speakers": "4", "language": "",
        "prompt": "Minutes.", "kv_policy": "output-window", "kv_opt": "sink=8,window=32",
        "logprob_threshold": "null", "compression_ratio_threshold": "2.0", "seed": 3})
    assert o.chunk_size is None and o.batch_size == 8 and o.diarize is True and o.word_timestamps is False
    assert o.temperature == (0.0, 0.2, 0.4) and o.num_speakers is None and o.max_speakers == 4
    assert o.language is None and o.initial_prompt == "Minutes." and o.seed == 3
    assert o.kv_opts == {"sink": "8", "window": "32"}
    assert o.decoding.logprob_threshold is None and o.decoding.compression_ratio_threshold == 2.0
    assert TranscribeOptions.from_mapping({"chunk_size": "30"}).chunk_size == 30.0
    assert TranscribeOptions.from_mapping({}) == TranscribeOptions()


@pytest.mark.parametrize("data, message", [
    ({"chunk_sise": "30"}, "unknown option 'chunk_sise'"),
    ({"batch_size": "many"}, "batch_size 'many': expected an integer"),
    ({"diarize": "maybe"}, "diarize 'maybe': expected true or false"),
    ({"temperature": "hot"}, "temperature 'hot'"),
    ({"chunk_size": "full", "chunk-size": "30"}, "given twice"),
    ({"decoding": "greedy"}, "cannot be given as text"),
])
def test_from_mapping_errors(data, message):
    with pytest.raises(OptionsError, match=message):
        TranscribeOptions.from_mapping(data)


def test_keywords_and_options_give_the_same_transcript(tiny, jfk_path):
    audio = load_audio(jfk_path)
    kw = dict(chunk_size=30, batch_size=4, temperature=0.0, initial_prompt="Inaugural address.")
    by_kw = murmur.transcribe(audio, tiny, **kw)
    by_options = murmur.transcribe(audio, tiny, TranscribeOptions(**kw))
    by_text = murmur.transcribe(audio, tiny, TranscribeOptions.from_mapping(
        {"chunk-size": "30", "batch-size": "4", "temperature": "0", "prompt": "Inaugural address."}))
    tokens = lambda r: [s.tokens for s in r.segments]  # noqa: E731
    assert by_kw.text and by_kw.text == by_options.text == by_text.text
    assert tokens(by_kw) == tokens(by_options) == tokens(by_text)
    # a DecodingOptions as `options` is still the decoding rules, and keywords change a given object
    old = murmur.transcribe(audio, tiny, DecodingOptions(initial_prompt="Inaugural address."), chunk_size=30,
                            batch_size=4, temperature=0.0)
    assert tokens(old) == tokens(by_kw)
    changed = murmur.transcribe(np.zeros(16000, np.float32), tiny, TranscribeOptions(), chunk_size="full")
    assert changed.stats["chunk_size"] == "full"
