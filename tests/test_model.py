import math

import pytest
import torch
import torch.nn.functional as F

from model.decoding import BeamHypothesis, Calibration, beam_search, greedy_decode, read_batch, read_views, score_sequences
from model.network import BOS, EOS, NUM_OUTPUTS, DigitClassifier, DigitReader, ModelConfig, PatchEmbedding
from tests.conftest import TINY


def test_patch_embedding_equals_strided_convolution():
    torch.manual_seed(0)
    embed = PatchEmbedding(in_channels=3, patch_size=4, d_model=16)
    conv = torch.nn.Conv2d(3, 16, kernel_size=4, stride=4)
    conv.weight.data = embed.proj.weight.data.view(16, 3, 4, 4).clone()
    assert conv.bias is not None
    conv.bias.data = embed.proj.bias.data.clone()
    x = torch.randn(2, 3, 12, 20)
    expected = conv(x).flatten(2).transpose(1, 2)
    assert torch.allclose(embed(x), expected, atol=1e-5)


def test_loss_at_init_is_uniform_over_outputs(tiny_reader):
    images = torch.rand(4, 1, 28, 56)
    tokens = torch.tensor([[BOS, 1, 2, 3]] * 4)
    logits = tiny_reader(images, tokens)
    loss = F.cross_entropy(logits.flatten(0, 1), torch.tensor([1, 2, 3, EOS] * 4))
    assert abs(loss.item() - torch.log(torch.tensor(float(NUM_OUTPUTS))).item()) < 0.1


def test_later_tokens_cannot_change_earlier_logits(tiny_reader):
    images = torch.rand(2, 1, 28, 84)
    tokens = torch.tensor([[BOS, 3, 1, 4, 1], [BOS, 5, 9, 2, 6]])
    changed = tokens.clone()
    changed[:, 3:] = torch.tensor([[7, 7], [0, 0]])
    a, b = tiny_reader(images, tokens), tiny_reader(images, changed)
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-5)
    assert not torch.allclose(a[:, 3:], b[:, 3:], atol=1e-5)


def test_cached_step_logits_equal_full_recomputation(tiny_reader):
    images = torch.rand(3, 1, 40, 60)
    tokens = torch.tensor([[BOS, 1, 2, 3, 4], [BOS, 9, 8, 7, 6], [BOS, 0, 0, 5, 5]])
    full = tiny_reader(images, tokens)
    encoded = tiny_reader.encoder(images)
    state = tiny_reader.decoder.start(encoded, tokens.shape[1])
    for t in range(tokens.shape[1]):
        step, _ = tiny_reader.decoder.step(tokens[:, t], state)
        assert torch.allclose(step, full[:, t], atol=1e-5)


def test_greedy_with_and_without_cache_agree_and_attention_is_a_distribution(tiny_reader):
    images = torch.rand(5, 1, 32, 64)
    cached = greedy_decode(tiny_reader, images, use_cache=True, return_attention=True)
    uncached = greedy_decode(tiny_reader, images, use_cache=False, return_attention=True)
    for a, b in zip(cached, uncached):
        assert a.attention is not None and b.attention is not None
        assert a.digits == b.digits
        assert torch.allclose(torch.tensor(a.step_probs), torch.tensor(b.step_probs), atol=1e-5)
        assert torch.allclose(a.attention, b.attention, atol=1e-5)
        steps, layers, heads, gh, gw = a.attention.shape
        assert (layers, heads) == (TINY.n_decoder_layers, TINY.n_heads) and (gh, gw) == a.grid
        assert steps == len(a.digits) + (1 if len(a.digits) < TINY.max_digits else 0)
        assert torch.allclose(a.attention.sum(dim=(-1, -2)), torch.ones(steps, layers, heads), atol=1e-5)


def test_beam_width_one_equals_greedy(tiny_reader):
    torch.manual_seed(1)
    images = torch.rand(6, 1, 28, 70)
    greedy = greedy_decode(tiny_reader, images)
    beams = beam_search(tiny_reader, images, beam_size=1)
    for g, b in zip(greedy, beams):
        assert b[0].digits == g.digits
        assert abs(b[0].probability - g.confidence) < 1e-4


def test_beam_search_returns_sorted_distinct_hypotheses(tiny_reader):
    images = torch.rand(2, 1, 28, 56)
    for hyps in beam_search(tiny_reader, images, beam_size=4):
        scores = [h.log_prob for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.digits) for h in hyps}) == len(hyps) == 4


def test_padding_mask_makes_batching_invisible(tiny_reader):
    torch.manual_seed(2)
    small = torch.rand(1, 1, 28, 36)
    big = torch.rand(1, 1, 56, 100)
    batch = torch.zeros(2, 1, 56, 100)
    mask = torch.zeros(2, 56, 100, dtype=torch.bool)
    batch[0, :, :28, :36], mask[0, :28, :36] = small[0], True
    batch[1], mask[1] = big[0], True
    tokens = torch.tensor([[BOS, 1, 2]])
    alone = tiny_reader(small, tokens)
    together = tiny_reader(batch, tokens.repeat(2, 1), mask)
    assert torch.allclose(alone[0], together[0], atol=1e-5)
    # The padded zeros must not leak: the same image padded with noise gives the same output.
    noisy = batch.clone()
    noisy[0, :, 32:, :] = 1.0  # whole padding tokens (stride 8), beyond the stem's reach into real ones
    noisy[0, :, :, 40:] = 1.0
    assert torch.allclose(tiny_reader(noisy, tokens.repeat(2, 1), mask)[0], alone[0], atol=1e-5)


def test_classifier_mode_and_oversized_input_error():
    model = DigitClassifier(ModelConfig(kind="classifier", d_model=32, n_heads=2, n_encoder_layers=1, stem_channels=(8,), patch_size=4))
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    reader = DigitReader(TINY)
    try:
        reader.encoder(torch.rand(1, 1, 400, 40))
    except ValueError as exc:
        assert "preprocess" in str(exc)
    else:
        raise AssertionError("oversized input was accepted")


def test_read_batch_encodes_once_and_answers_with_the_best_beam(tiny_reader):
    """The one reading path: the encoder runs once for greedy and beam together; the answer is the most
    probable of the beam's hypotheses and the greedy reading, and its step probabilities and attention
    belong to that answer."""
    torch.manual_seed(3)
    images = torch.rand(8, 1, 28, 84)
    calls = []
    hook = tiny_reader.encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        answers = read_batch(tiny_reader, images, beam=4, attention=True)
    finally:
        hook.remove()
    assert len(calls) == 1
    beams = beam_search(tiny_reader, images, beam_size=4)
    greedy = greedy_decode(tiny_reader, images)
    for (reading, hyps), expected, first in zip(answers, beams, greedy):
        candidates = list(expected)
        if all(h.digits != first.digits for h in expected):
            candidates.append(BeamHypothesis(first.digits, sum(math.log(p) for p in first.step_probs)))
        assert [h.digits for h in hyps] == [h.digits for h in sorted(candidates, key=lambda h: -h.log_prob)[:4]]
        assert reading.digits == hyps[0].digits
        assert abs(reading.confidence - hyps[0].probability) < 1e-4
        assert reading.confidence >= first.confidence - 1e-6
        assert reading.attention is not None and reading.attention.shape[0] == len(reading.step_probs)


def test_read_batch_answers_greedy_where_the_beam_lost_a_more_probable_reading(tiny_reader, monkeypatch):
    """A beam can prune the greedy path and finish on less probable readings; the answer is then the greedy
    reading, ranked among the beam's hypotheses by its own probability."""
    torch.manual_seed(4)
    images = torch.rand(3, 1, 28, 84)
    greedy = greedy_decode(tiny_reader, images)
    worse = [
        [BeamHypothesis([(d + 1) % 10 for d in g.digits] + extra, math.log(g.confidence) - 1.0 - k) for k, extra in enumerate(([7], [7, 1]))]
        for g in greedy
    ]
    monkeypatch.setattr("model.decoding.beam_search", lambda *args, **kwargs: [list(hyps) for hyps in worse])
    for (reading, hyps), first, lost in zip(read_batch(tiny_reader, images, beam=2), greedy, worse):
        assert reading.digits == first.digits and reading.step_probs == first.step_probs
        assert [h.digits for h in hyps] == [first.digits, lost[0].digits]
        assert abs(hyps[0].probability - first.confidence) < 1e-5


def test_temperature_changes_confidence_not_the_greedy_reading(tiny_reader):
    images = torch.rand(4, 1, 28, 56)
    plain = read_batch(tiny_reader, images)
    sharp = read_batch(tiny_reader, images, temperature=0.5)
    for (a, _), (b, _) in zip(plain, sharp):
        assert a.digits == b.digits
        assert all(q >= p - 1e-6 for p, q in zip(a.step_probs, b.step_probs))  # a cooler softmax is surer of its argmax


@pytest.mark.parametrize("stack", [False, True])
def test_one_view_is_read_batch_and_two_copies_of_it_read_the_same(tiny_reader, stack):
    torch.manual_seed(5)
    images = torch.rand(6, 1, 28, 56)
    single = read_batch(tiny_reader, images, beam=3, attention=True)
    assert [r.digits for r, _ in read_views(tiny_reader, [(images, None)], beam=3, attention=True)] == [r.digits for r, _ in single]
    twice = read_views(tiny_reader, [(images, None), (images, None)], attention=True, stack=stack)
    for (reading, alternatives), (greedy, _) in zip(twice, read_batch(tiny_reader, images, attention=True)):
        assert reading.digits == greedy.digits and alternatives == []
        assert reading.step_probs == [pytest.approx(p, abs=1e-5) for p in greedy.step_probs]
        assert reading.attention is not None and greedy.attention is not None
        assert torch.allclose(reading.attention, greedy.attention, atol=1e-5)


@pytest.mark.parametrize("stack", [False, True])
def test_the_views_answer_is_the_candidate_they_find_most_probable_together(tiny_reader, stack):
    """Each view's greedy reading is a candidate; the answer has the highest probability summed in log over
    the views, and its confidence is the views' geometric mean. Stacked, the views of different sizes are
    padded into one batch, which must not change what each view reads."""
    torch.manual_seed(6)
    views = [(torch.rand(8, 1, 28, 56), None), (torch.rand(8, 1, 36, 72), None), (torch.rand(8, 1, 32, 64), None)]
    answers = read_views(tiny_reader, views, beam=3, stack=stack)
    encoded = [tiny_reader.encoder(images) for images, _ in views]
    greedy = [greedy_decode(tiny_reader, images) for images, _ in views]

    def total_log(b: int, digits: list[int]) -> float:
        rows = [score_sequences(tiny_reader, view, [digits] * 8)[b] for view in encoded]
        return sum(math.log(p) for reading in rows for p in reading.step_probs)

    for b, (reading, alternatives) in enumerate(answers):
        best = total_log(b, reading.digits)
        assert math.exp(best / 3) == pytest.approx(reading.confidence, rel=1e-3)
        for view in greedy:
            assert total_log(b, view[b].digits) <= best + 1e-4
        assert alternatives[0].digits == reading.digits
        assert [h.log_prob for h in alternatives] == sorted((h.log_prob for h in alternatives), reverse=True)


def test_readings_from_views_have_their_own_calibration_map():
    meta = {"calibration": {"temperature": 0.7, "slope": 1.4, "intercept": -0.8,
                            "views": {"scales": [1.0, 1.125], "slope": 1.1, "intercept": -0.2}}}
    assert Calibration.from_meta(meta) == Calibration(0.7, 1.4, -0.8)
    assert Calibration.from_meta(meta, (1.0, 1.125)) == Calibration(0.7, 1.1, -0.2)
    assert Calibration.from_meta(meta, (1.0, 1.25)) == Calibration(0.7, 1.4, -0.8)  # fitted for other scales: not used
