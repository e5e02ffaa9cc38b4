"""Tests of the ASR example's tokenizer, greedy CTC decoding, error rates and CTC transformer."""

from __future__ import annotations

import jiwer
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

from dpfl.simulation import train_cohort_vectorized, train_local
from examples.asr.model import CONFIGS, CTCTransformer, ModelConfig, get_config, output_lengths
from examples.asr.text import BLANK, CharTokenizer, error_rates, greedy_decode, normalize_transcript
from examples.asr.train import (
    BatchTensors,
    align_batches,
    batch_loss,
    evaluate,
    make_batches,
    train_central,
)

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


def test_forward_vectorizes_over_users_with_ragged_lengths() -> None:
    """vmap over stacked parameter sets (vectorized cohort training) equals a loop over models,
    also when the lengths differ within a batch (the attention mask is needed)."""
    cfg = get_config("tiny")
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(CTCTransformer(cfg).eval())
    stacked = {k: torch.stack([dict(m.named_parameters())[k].detach() for m in models])
               for k, _ in models[0].named_parameters()}
    x = torch.randn(3, 2, 40, 80)
    lengths = torch.tensor([[40, 25], [40, 40], [12, 31]])

    def run(params: dict[str, torch.Tensor], f: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(models[0], params, (f, n))[0]

    with sdpa_kernel(SDPBackend.MATH):
        got = torch.func.vmap(run)(stacked, x, lengths)
    for u, m in enumerate(models):
        want, n_out = m(x[u], lengths[u])
        for i, n in enumerate(n_out.tolist()):
            torch.testing.assert_close(got[u, i, :n], want[i, :n], rtol=1e-4, atol=1e-5)


def ragged_batches() -> list:  # type: ignore[type-arg]
    """Three users' batches that differ in frames, target lengths and utterance count."""
    g = torch.Generator().manual_seed(0)
    texts = [["ab c", "d"], ["hello there", "x y z", "q"], ["mm"]]
    return [make_batches([torch.randn(20 + 9 * i + 5 * u, 80, generator=g) for i in range(len(t))],
                         t, TOK, batch_size=3)[0] for u, t in enumerate(texts)]


def test_align_batches_pads_to_common_shapes_without_changing_any_loss() -> None:
    torch.manual_seed(0)
    model = CTCTransformer(get_config("tiny")).eval()
    batches = ragged_batches()
    aligned = align_batches([b.tensors() for b in batches])
    assert all(isinstance(a, BatchTensors) for a in aligned)
    assert len({tuple(t.shape for t in a) for a in aligned}) == 1  # they stack
    assert [a.weights.tolist() for a in aligned] == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]
    for b, a in zip(batches, aligned, strict=True):
        torch.testing.assert_close(batch_loss(model, a), batch_loss(model, b), rtol=1e-5, atol=1e-5)
    assert align_batches([]) == []
    with pytest.raises(TypeError, match=r"batches\[1\] must be a BatchTensors"):
        align_batches([batches[0].tensors(), batches[1]])  # type: ignore[list-item]


def test_vectorized_local_training_matches_the_sequential_loop() -> None:
    """The example's CTC model trains a ragged cohort vectorized (no fallback) with the same
    updates as dpfl's sequential loop on the unpadded batches."""
    torch.manual_seed(0)
    model = CTCTransformer(get_config("tiny"))
    users = [[b] for b in ragged_batches()]
    kw = {"lr": 0.1, "steps": 3, "max_grad_norm": 1.0}
    vec = train_cohort_vectorized(model, [[b.tensors() for b in u] for u in users], batch_loss,
                                  fallback=False, align=align_batches, **kw)
    for v, u in zip(vec, users, strict=True):
        s = train_local(model, u, batch_loss, **kw)
        err = torch.cat([(v[k] - s[k]).flatten() for k in s]).norm()
        assert float(err / torch.cat([s[k].flatten() for k in s]).norm()) < 1e-4


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
