"""Tests of the ASR example's tokenizer, greedy CTC decoding, error rates and CTC transformer."""

from __future__ import annotations

import jiwer
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from examples.asr.model import CONFIGS, CTCTransformer, ModelConfig, get_config, output_lengths
from examples.asr.text import BLANK, CharTokenizer, error_rates, greedy_decode, normalize_transcript
from examples.asr.train import batch_loss, evaluate, make_batches, train_central

TOK = CharTokenizer()
ALPHABET = " '-abcdefghijklmnopqrstuvwxyz"
words = st.text(alphabet="'-abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)
sentences = st.lists(words, min_size=1, max_size=6).map(" ".join)


# ---------------------------------------------------------------- tokenizer and decoding


def test_alphabet_is_the_papers_english_one() -> None:
    assert len(TOK) == TOK.vocab_size == 30
    assert set(TOK.symbols) == set(ALPHABET)
    assert BLANK == 0 and 0 not in TOK.encode("abc xyz")


@given(sentences)
def test_tokenizer_round_trip(text: str) -> None:
    ids = TOK.encode(text)
    assert all(1 <= i < len(TOK) for i in ids)
    assert TOK.decode(ids) == text
    assert TOK.decode(torch.tensor(ids)) == text


def test_normalisation_maps_raw_transcripts_onto_the_alphabet() -> None:
    assert normalize_transcript("HELLO, World!  It’s  café—time 42") == "hello world it's cafe time"
    assert TOK.decode(TOK.encode("NOR'-EASTER")) == "nor'-easter"


def test_tokenizer_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="ids"):
        TOK.decode([30])
    with pytest.raises(ValueError, match="duplicates"):
        CharTokenizer(["a", "a"])
    with pytest.raises(ValueError, match="not in the tokenizer"):
        CharTokenizer(["a"]).encode("ab")


def _frames_to_log_probs(frames: list[int]) -> torch.Tensor:
    return torch.log_softmax(
        10.0 * torch.nn.functional.one_hot(torch.tensor(frames), 30).float(), -1
    )


@given(sentences, st.data())
def test_greedy_decode_inverts_any_ctc_alignment(text: str, data: st.DataObject) -> None:
    """Any valid CTC path (repeats, blanks between equal symbols) decodes back to the text."""
    frames: list[int] = [BLANK] * data.draw(st.integers(0, 2))
    previous = None
    for idx in TOK.encode(text):
        if idx == previous:
            frames.append(BLANK)  # CTC needs a blank between two equal symbols
        frames += [idx] * data.draw(st.integers(1, 3))
        frames += [BLANK] * data.draw(st.integers(0, 2))
        previous = idx
    [decoded] = greedy_decode(_frames_to_log_probs(frames)[None], None, TOK)
    assert decoded == text


def test_greedy_decode_collapses_repeats_and_drops_blanks_and_padding() -> None:
    c, a, t = TOK.encode("cat")
    frames = [c, c, BLANK, a, a, a, t, BLANK, t, c, c]
    log_probs = _frames_to_log_probs(frames)[None].repeat(2, 1, 1)
    out = greedy_decode(log_probs, torch.tensor([9, 2]), TOK)
    assert out == ["catt", "c"]  # frames past each length are padding and ignored


def test_error_rates_agree_with_jiwer_on_normalised_text() -> None:
    refs = ["The cat sat", "on the mat", ""]
    hyps = ["the cat sad", "on mat", "ignored"]
    rates = error_rates(refs, hyps)
    assert rates.num_utterances == 2
    assert rates.wer == pytest.approx(
        jiwer.wer(["the cat sat", "on the mat"], ["the cat sad", "on mat"])
    )
    assert rates.cer == pytest.approx(
        jiwer.cer(["the cat sat", "on the mat"], ["the cat sad", "on mat"])
    )
    assert error_rates(["a b"], ["a b"]).wer == 0.0
    with pytest.raises(ValueError, match="differ in length"):
        error_rates(["a"], [])


# ---------------------------------------------------------------- model


def test_paper_config_parameter_count_on_meta_device() -> None:
    """The paper model: 255,800,862 parameters in 294 tensors, never allocated."""
    with torch.device("meta"):
        model = CTCTransformer(get_config("paper"))
    params = dict(model.named_parameters())
    assert all(p.is_meta for p in params.values())
    assert len(params) == 294
    assert abs(sum(p.numel() for p in params.values()) - 255_800_862) <= 5
    cfg = get_config("paper")
    assert (cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.n_layers) == (768, 4, 3072, 36)
    assert (cfg.dropout, cfg.layerdrop, cfg.conv_kernel, cfg.conv_stride) == (0.3, 0.3, 7, 3)
    assert params["blocks.0.in_proj.weight"].shape == (2304, 768)
    assert params["conv.weight"].shape == (1536, 80, 7)
    assert params["head.weight"].shape == (30, 768)
    assert not any(n.endswith("proj.bias") or ".fc" in n and n.endswith("bias") for n in params)


def test_small_default_config_is_small() -> None:
    n = sum(p.numel() for p in CTCTransformer(get_config("small")).parameters())
    assert 2e5 < n < 3e6
    assert set(CONFIGS) >= {"paper", "small", "tiny"}


def test_config_validation_names_the_parameter() -> None:
    with pytest.raises(ValueError, match="n_heads"):
        ModelConfig(d_model=10, n_heads=3)
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(dropout=1.0)
    with pytest.raises(ValueError, match="unknown model config"):
        get_config("huge")
    with pytest.raises(ValueError, match="features"):
        CTCTransformer(get_config("tiny"))(torch.zeros(1, 10, 40))


def test_output_lengths_and_padding_invariance() -> None:
    """Padding a batch does not change the valid outputs of an utterance (eval mode)."""
    cfg = get_config("tiny")
    torch.manual_seed(0)
    model = CTCTransformer(cfg).eval()
    x = torch.randn(1, 37, 80)
    alone, n_alone = model(x)
    padded = torch.cat([x, torch.zeros(1, 20, 80)], dim=1)
    batch = torch.cat([padded, torch.randn(1, 57, 80)])
    out, n = model(batch, torch.tensor([37, 57]))
    assert n.tolist() == [13, 19] == output_lengths(torch.tensor([37, 57]), cfg).tolist()
    assert int(n_alone) == 13
    torch.testing.assert_close(out[0, :13], alone[0], rtol=1e-4, atol=1e-4)


def test_dropout_and_layerdrop_follow_the_generator() -> None:
    cfg = get_config("tiny", dropout=0.3, layerdrop=0.5)
    model = CTCTransformer(cfg).train()
    x = torch.randn(2, 30, 80)
    a, _ = model(x, generator=torch.Generator().manual_seed(1))
    b, _ = model(x, generator=torch.Generator().manual_seed(1))
    c, _ = model(x, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_ctc_model_overfits_a_handful_of_utterances() -> None:
    """Random-feature 'utterances' are memorised: greedy WER reaches 0 (seed training loop, LARS)."""
    g = torch.Generator().manual_seed(0)
    texts = ["the cat", "a dog ran", "it's red", "blue-green sky"]
    feats = [torch.randn(n, 80, generator=g) for n in (40, 55, 48, 70)]
    batches = make_batches(feats, texts, TOK, batch_size=4)
    torch.manual_seed(0)
    model = CTCTransformer(get_config("tiny"))
    with torch.no_grad():
        before = float(batch_loss(model, batches[0]))
    losses = train_central(model, batches, steps=80, lr=10.0, warmup_steps=10, seed=0)
    assert losses[-1] < 0.1 * before
    rates, hyps = evaluate(model, batches, TOK)
    assert sorted(hyps) == sorted(texts)
    assert rates.wer == 0.0 and rates.cer == 0.0
