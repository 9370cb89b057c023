"""The output stage on CPU without a model: incremental detokenization (multi-byte characters
split across tokens) and stop decisions, fed token by token."""

from __future__ import annotations

import pytest

from nv_engine.core.detokenizer import IncrementalDetokenizer
from nv_engine.core.output_processor import OutputProcessor
from nv_engine.core.sequence import Sequence
from nv_engine.sampling_params import SamplingParams

EOS = 0


@pytest.fixture(scope="module")
def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: every UTF-8 byte is its own token, so a
    character of 2-4 bytes is split across 2-4 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"</s>": EOS, **{ch: i + 1 for i, ch in enumerate(sorted(alphabet))}}
    tok = Tokenizer(models.BPE(vocab, [], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


TEXTS = ["héllo wörld", "日本語のテキスト", "emoji 🎉🚀 and ascii", "mixed: ∑ é 🎉 x"]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_hold_back_split_characters(byte_tokenizer, text):
    ids = byte_tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode())  # one token per byte: characters are split
    prompt = byte_tokenizer.encode("prompt: ", add_special_tokens=False)
    detok = IncrementalDetokenizer(byte_tokenizer, prompt)
    deltas = [detok.step([t]) for t in ids]
    deltas.append(detok.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text == byte_tokenizer.decode(ids)
    assert "" in deltas[:-1]  # some step held its bytes back


def test_flush_gives_an_incomplete_character_as_a_full_decode_does(byte_tokenizer):
    ids = byte_tokenizer.encode("ab🎉", add_special_tokens=False)[:-1]  # cut inside the emoji
    detok = IncrementalDetokenizer(byte_tokenizer, [])
    text = "".join(detok.step([t]) for t in ids)
    assert text == "ab"
    assert text + detok.flush() == byte_tokenizer.decode(ids)


class _Run:
    """An OutputProcessor over one Sequence, fed token by token like the engine does."""

    def __init__(self, tokenizer, params: SamplingParams, stream: bool = True) -> None:
        self.finished: list[tuple[int, str]] = []
        self.proc = OutputProcessor(
            tokenizer, {EOS}, 10_000, lambda seq, reason: self.finished.append((seq, reason))
        )
        self.seq = Sequence(tokenizer.encode("say: ", add_special_tokens=False), params, 0)
        self.proc.add(self.seq, stream)
        self.outputs = []

    def feed(self, token_ids: list[int]) -> None:
        for t in token_ids:
            if self.finished:
                return
            self.seq.token_ids.append(t)
            self.outputs += self.proc.process([(self.seq, t)])


def _ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_deltas(byte_tokenizer, include):
    params = SamplingParams(stop=["wörld", "zzz"], include_stop_str_in_output=include)
    run = _Run(byte_tokenizer, params)
    run.feed(_ids(byte_tokenizer, "héllo wörld and more"))
    assert run.finished == [(run.seq, "stop")]
    final = run.outputs[-1]
    assert final.finished and final.outputs[0].stop_reason == "wörld"
    expected = "héllo wörld" if include else "héllo "
    assert final.text == expected
    streamed = "".join(o.delta_text for o in run.outputs)
    assert streamed == expected
    # no delta ever showed part of the stop string that was later cut
    for o in run.outputs[:-1]:
        assert expected.startswith(o.text)
    # every token up to the one completing the stop string is kept
    assert final.token_ids == _ids(byte_tokenizer, "héllo wörld")
    for out in run.outputs:  # counted without copying the ids
        assert out.outputs[0].num_tokens == len(out.outputs[0].token_ids)


def test_stop_strings_respect_min_tokens(byte_tokenizer):
    ids = _ids(byte_tokenizer, "ab ab ab")
    run = _Run(byte_tokenizer, SamplingParams(stop=["ab"], min_tokens=4))
    run.feed(ids)
    # the "ab"s ending within the first 3 tokens do not count; the one ending at token 5 does
    assert run.finished == [(run.seq, "stop")]
    assert run.outputs[-1].text == "ab "
    assert run.outputs[-1].token_ids == ids[:5]


def test_token_stops_in_order(byte_tokenizer):
    a, b = _ids(byte_tokenizer, "ab")
    run = _Run(byte_tokenizer, SamplingParams(min_tokens=3, stop_token_ids=[b]))
    run.feed([EOS, b, a, EOS])  # EOS and b banned by min_tokens at the sampler; here: ignored
    assert run.finished == [(run.seq, "stop")]
    out = run.outputs[-1].outputs[0]
    assert out.token_ids == [EOS, b, a, EOS] and out.stop_reason is None  # EOS
    run = _Run(byte_tokenizer, SamplingParams(stop_token_ids=[b]))
    run.feed([a, b, a])
    assert run.outputs[-1].outputs[0].stop_reason == b
    run = _Run(byte_tokenizer, SamplingParams(max_tokens=3, ignore_eos=True), stream=False)
    run.feed([EOS, a, EOS, a])
    assert [o.finish_reason for o in run.outputs] == ["length"]  # only the final one
    assert run.outputs[0].token_ids == [EOS, a, EOS]


def test_length_limit_and_stop_string_on_the_same_token(byte_tokenizer):
    ids = _ids(byte_tokenizer, "xyz")
    run = _Run(byte_tokenizer, SamplingParams(max_tokens=3, stop=["yz"]))
    run.feed(ids)
    assert run.finished == [(run.seq, "stop")]  # the stop string wins, as in vLLM
    assert run.outputs[-1].text == "x"


def test_abort_gives_a_final_output_to_streams_only(byte_tokenizer):
    run = _Run(byte_tokenizer, SamplingParams())
    run.feed(_ids(byte_tokenizer, "hi"))
    final = run.proc.abort(run.seq)
    assert final.finished and final.finish_reason == "abort" and final.text == "hi"
    assert not run.proc.has_unfinished()
    quiet = _Run(byte_tokenizer, SamplingParams(), stream=False)
    quiet.feed(_ids(byte_tokenizer, "hi"))
    assert quiet.outputs == [] and quiet.proc.abort(quiet.seq) is None
