"""Autoregressive decoding: greedy (with or without the key/value cache), beam search, and `read_batch`,
the one path by which the app, the CLI, evaluation and training-time validation read.

Every function takes images already preprocessed to the model's canonical form
(see `model/preprocess.py`) and returns digit lists, never token ids. Probabilities
are softmax(logits / temperature); `Calibration` holds a checkpoint's temperature and
the map that turns a reading's probability into the probability of being right.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from model.network import BOS, EOS, DigitReader, EncodedImages


@dataclass
class Reading:
    """One image's greedy reading.

    step_probs[i] is the probability the model gave the token it chose at step i
    (the digits, then EOS). attention, when asked for, is a tensor
    (steps, layers, heads, grid_h, grid_w) of cross-attention weights.
    """

    digits: list[int]
    step_probs: list[float]
    attention: torch.Tensor | None = None
    grid: tuple[int, int] | None = None

    @property
    def confidence(self) -> float:
        """Probability of the whole sequence, EOS included."""
        out = 1.0
        for p in self.step_probs:
            out *= p
        return out


@dataclass
class BeamHypothesis:
    digits: list[int]
    log_prob: float

    @property
    def probability(self) -> float:
        return float(torch.tensor(self.log_prob).exp())


@dataclass(frozen=True)
class Calibration:
    """How a checkpoint's raw probabilities become probabilities of being right (train/calibrate.py).

    Step probabilities are softmax(logits / temperature); a reading's confidence is then
    sigmoid(slope * logit(product of its step probabilities) + intercept). A temperature alone
    left the model under-confident above 0.9 and over-confident in the middle; the two-parameter
    map on the whole reading's probability corrects both.
    """

    temperature: float = 1.0
    slope: float = 1.0
    intercept: float = 0.0

    @classmethod
    def from_meta(cls, meta: dict, scales: tuple[float, ...] = (1.0,)) -> Calibration:
        """The checkpoint's calibration of readings from one view, or from views at `scales` (read_views): the
        same temperature with the map fitted to the views' geometric mean where the checkpoint has one for
        these scales, else the one-view map, which fits them roughly."""
        found = meta.get("calibration", {})
        views = found.get("views", {})
        if len(scales) > 1 and tuple(views.get("scales", ())) == tuple(scales):
            found = {**found, **views}
        return cls(float(found.get("temperature", 1.0)), float(found.get("slope", 1.0)), float(found.get("intercept", 0.0)))

    def confidence(self, probability: float) -> float:
        """The calibrated confidence of a reading whose steps multiply to `probability`."""
        if self.slope == 1.0 and self.intercept == 0.0:
            return probability
        p = min(max(probability, 1e-9), 1 - 1e-9)
        return 1.0 / (1.0 + math.exp(-(self.slope * math.log(p / (1 - p)) + self.intercept)))


UNCALIBRATED = Calibration()  # a checkpoint's own probabilities


@dataclass
class _GreedyTrace:
    tokens: list[torch.Tensor] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)
    attention: list[torch.Tensor] = field(default_factory=list)


def _max_steps(model: DigitReader, max_digits: int | None) -> int:
    limit = model.cfg.max_digits if max_digits is None else min(max_digits, model.cfg.max_digits)
    return limit + 1  # room for EOS


def _to_readings(trace: _GreedyTrace, encoded: EncodedImages, return_attention: bool) -> list[Reading]:
    tokens = torch.stack(trace.tokens, dim=1).tolist()  # (B, steps)
    probs = torch.stack(trace.probs, dim=1).tolist()
    attention = torch.stack(trace.attention, dim=1) if return_attention else None  # (B, steps, L, h, N)
    readings = []
    for b, row in enumerate(tokens):
        n = row.index(EOS) + 1 if EOS in row else len(row)
        digits = [t for t in row[:n] if t != EOS]
        reading = Reading(digits=digits, step_probs=probs[b][:n], grid=encoded.grid)
        if attention is not None:
            reading.attention = attention[b, :n].reshape(n, *attention.shape[2:4], *encoded.grid)
        readings.append(reading)
    return readings


def _rows(encoded: EncodedImages, index: torch.Tensor) -> EncodedImages:
    """The encoder output of the images at `index` (repeats allowed: beam search fans each image out)."""
    return EncodedImages(encoded.memory.index_select(0, index), encoded.token_mask.index_select(0, index), encoded.grid, encoded.has_padding)


@torch.no_grad()
def greedy_decode(
    model: DigitReader,
    images: torch.Tensor,
    pixel_mask: torch.Tensor | None = None,
    use_cache: bool = True,
    return_attention: bool = False,
    max_digits: int | None = None,
    temperature: float = 1.0,
    encoded: EncodedImages | None = None,
) -> list[Reading]:
    """Read a batch greedily, stopping as soon as every sequence has emitted EOS.

    use_cache=False recomputes the whole prefix at every step; it exists as the
    reference the cache is tested and benchmarked against. `encoded`, if given, is
    the encoder's output for these images (read_batch shares it with beam search).
    """
    encoded = model.encoder(images, pixel_mask) if encoded is None else encoded
    batch = images.shape[0]
    steps = _max_steps(model, max_digits)
    token = torch.full((batch,), BOS, dtype=torch.long, device=images.device)
    prefix = token[:, None]
    state = model.decoder.start(encoded, steps) if use_cache else None
    finished = torch.zeros(batch, dtype=torch.bool, device=images.device)
    trace = _GreedyTrace()
    for _ in range(steps):
        if state is not None:
            logits, weights = model.decoder.step(token, state, return_attention)
        else:
            all_logits, all_weights = model.decoder(prefix, encoded, return_attention)
            logits = all_logits[:, -1]
            weights = [w[:, :, -1] for w in all_weights]
        probs = (logits.float() / temperature).softmax(-1)
        best_prob, token = probs.max(-1)
        token = torch.where(finished, torch.full_like(token, EOS), token)
        trace.tokens.append(token)
        trace.probs.append(best_prob)
        if return_attention:
            trace.attention.append(torch.stack(weights, dim=1))  # (B, L, h, N)
        finished |= token == EOS
        if bool(finished.all()):
            break
        prefix = torch.cat([prefix, token[:, None]], dim=1)
    return _to_readings(trace, encoded, return_attention)


@torch.no_grad()
def beam_search(
    model: DigitReader,
    images: torch.Tensor,
    pixel_mask: torch.Tensor | None = None,
    beam_size: int = 4,
    max_digits: int | None = None,
    temperature: float = 1.0,
    encoded: EncodedImages | None = None,
) -> list[list[BeamHypothesis]]:
    """Beam search with the key/value cache; returns each image's finished hypotheses, best first.

    Scores are summed log-probabilities (no length penalty: every hypothesis
    pays for its EOS, and digit counts are what the image shows).
    """
    encoded = model.encoder(images, pixel_mask) if encoded is None else encoded
    batch, device = images.shape[0], images.device
    steps = _max_steps(model, max_digits)
    # Every image starts with one live beam; the others begin at -inf so the first step fans out.
    encoded = _rows(encoded, torch.arange(batch, device=device).repeat_interleave(beam_size))
    state = model.decoder.start(encoded, steps)
    scores = torch.full((batch, beam_size), float("-inf"), device=device)
    scores[:, 0] = 0.0
    token = torch.full((batch * beam_size,), BOS, dtype=torch.long, device=device)
    history = torch.zeros(batch * beam_size, 0, dtype=torch.long, device=device)
    finished: list[list[BeamHypothesis]] = [[] for _ in range(batch)]
    for step in range(steps):
        logits, _ = model.decoder.step(token, state)
        log_probs = (logits.float() / temperature).log_softmax(-1)
        vocab = log_probs.shape[-1]
        if step == steps - 1:  # out of room: only EOS may follow
            forced = torch.full_like(log_probs, float("-inf"))
            forced[:, EOS] = log_probs[:, EOS]
            log_probs = forced
        candidates = (scores.view(-1, 1) + log_probs).view(batch, beam_size * vocab)
        top_scores, top_index = candidates.topk(2 * beam_size, dim=1)
        beam_index, token_index = top_index // vocab, top_index % vocab
        next_scores = torch.full((batch, beam_size), float("-inf"), device=device)
        next_rows = torch.zeros(batch, beam_size, dtype=torch.long, device=device)
        next_tokens = torch.full((batch, beam_size), EOS, dtype=torch.long, device=device)
        top_scores_list, beam_list, token_list = top_scores.tolist(), beam_index.tolist(), token_index.tolist()
        for b in range(batch):
            kept = 0
            for score, beam, tok in zip(top_scores_list[b], beam_list[b], token_list[b]):
                if score == float("-inf") or kept == beam_size:
                    break
                row = b * beam_size + beam
                if tok == EOS:
                    finished[b].append(BeamHypothesis(history[row].tolist(), score))
                    continue
                next_scores[b, kept], next_rows[b, kept], next_tokens[b, kept] = score, row, tok
                kept += 1
        # An image is done once its beam_size best finished hypotheses beat every live one
        # (scores only fall as a hypothesis grows).
        for f in finished:
            f.sort(key=lambda h: -h.log_prob)
            del f[beam_size:]
        best_live = next_scores.max(dim=1).values.tolist()
        done = all(len(f) >= beam_size and f[-1].log_prob >= live for f, live in zip(finished, best_live))
        if done or bool(torch.isinf(next_scores).all()):
            break
        rows = next_rows.view(-1)
        state.reorder(rows)
        history = torch.cat([history.index_select(0, rows), next_tokens.view(-1, 1)], dim=1)
        scores = next_scores
        token = next_tokens.view(-1)
    return finished


@torch.no_grad()
def score_sequences(
    model: DigitReader, encoded: EncodedImages, sequences: list[list[int]], return_attention: bool = False,
    temperature: float = 1.0,
) -> list[Reading]:
    """Readings of given digit sequences: one teacher-forced pass gives each step's probability
    (digits, then EOS) and, if asked, the cross-attention of every step."""
    length = max(len(seq) for seq in sequences) + 1
    tokens = torch.full((len(sequences), length), EOS, dtype=torch.long, device=encoded.memory.device)
    for b, seq in enumerate(sequences):
        tokens[b, : len(seq) + 1] = torch.tensor([BOS, *seq])
    logits, weights = model.decoder(tokens, encoded, return_attention)
    probs = (logits.float() / temperature).softmax(-1)
    targets = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], EOS)], dim=1)  # each step's chosen token
    chosen = probs.gather(-1, targets[..., None])[..., 0].tolist()
    attention = torch.stack(weights, dim=2) if return_attention else None  # (B, h, L, T, N) -> below
    readings = []
    for b, seq in enumerate(sequences):
        n = len(seq) + 1
        reading = Reading(digits=list(seq), step_probs=chosen[b][:n], grid=encoded.grid)
        if attention is not None:
            steps = attention[b].permute(2, 1, 0, 3)[:n]  # (h, L, T, N) -> (T, L, h, N)
            reading.attention = steps.reshape(n, *steps.shape[1:3], *encoded.grid)
        readings.append(reading)
    return readings


@torch.no_grad()
def read_batch(
    model: DigitReader, images: torch.Tensor, pixel_mask: torch.Tensor | None = None, beam: int = 0,
    attention: bool = False, temperature: float = 1.0,
) -> list[tuple[Reading, list[BeamHypothesis]]]:
    """Read a batch: (the answer's Reading, the beam's hypotheses best first) per image.

    The encoder runs once; greedy decoding and, with beam > 1, beam search share
    its output. The answer is the most probable of the beam's hypotheses and the
    greedy reading when there is a beam (a beam can prune the greedy path early and
    finish on less probable readings), the greedy reading otherwise. Where the
    answer differs from the greedy one, its Reading (step probabilities and
    attention) comes from a teacher-forced pass over the answer, so what is shown
    is always what was answered.
    """
    encoded = model.encoder(images, pixel_mask)
    readings = greedy_decode(model, images, pixel_mask, return_attention=attention, temperature=temperature, encoded=encoded)
    if beam <= 1:
        return [(reading, []) for reading in readings]
    beams = beam_search(model, images, pixel_mask, beam_size=beam, temperature=temperature, encoded=encoded)
    for reading, hyps in zip(readings, beams):
        if all(h.digits != reading.digits for h in hyps):
            hyps.append(BeamHypothesis(list(reading.digits), sum(math.log(max(p, 1e-30)) for p in reading.step_probs)))
            hyps.sort(key=lambda h: -h.log_prob)
            del hyps[beam:]
    differ = [i for i, (reading, hyps) in enumerate(zip(readings, beams)) if hyps and hyps[0].digits != reading.digits]
    if differ:
        subset = _rows(encoded, torch.tensor(differ, device=images.device))
        rescored = score_sequences(model, subset, [beams[i][0].digits for i in differ], attention, temperature)
        for i, reading in zip(differ, rescored):
            readings[i] = reading
    return list(zip(readings, beams))


# Up to this many images, read_views decodes all views of a batch as one batch: each decoder step then pays
# its fixed cost (a few dozen small matrix products) once rather than once a view, which outweighs the work
# spent on padding the smaller views to the largest. Larger batches are bound by arithmetic, and padding loses.
STACKED_VIEWS_MAX_BATCH = 4


def _stack_views(views: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The views' images as one batch, view by view, zero-padded at the bottom and right to the largest,
    with a pixel mask saying which pixels are each view's own."""
    height = max(images.shape[2] for images, _ in views)
    width = max(images.shape[3] for images, _ in views)
    batches, masks = [], []
    for images, mask in views:
        mask = torch.ones(images.shape[0], *images.shape[2:], dtype=torch.bool, device=images.device) if mask is None else mask
        pad = (0, width - images.shape[3], 0, height - images.shape[2])
        batches.append(torch.nn.functional.pad(images, pad))
        masks.append(torch.nn.functional.pad(mask, pad, value=False))
    return torch.cat(batches), torch.cat(masks)


@torch.no_grad()
def read_views(
    model: DigitReader, views: Sequence[tuple[torch.Tensor, torch.Tensor | None]], beam: int = 0, attention: bool = False,
    temperature: float = 1.0, stack: bool | None = None,
) -> list[tuple[Reading, list[BeamHypothesis]]]:
    """Read a batch from several views of each image, the same ink at several scales
    (`model.preprocess.Preprocessed.at_scale`): (the answer's Reading, the candidates best first) per image.

    Where a digit falls on the grid of patches changes what the encoder sees of it, and each view
    misreads different images. Each view is read greedily (and, with beam > 1, the first view by a beam
    search as well); every distinct answer is then scored under every view by a teacher-forced pass,
    and the answer is the candidate whose probability, multiplied over the views, is highest. The
    Reading's step probabilities are each step's geometric mean over the views, so its confidence is the
    views' geometric mean; its attention (if asked) is the first view's, which should be the image at the
    model's own scale. With beam > 1 the candidates, scored the same way, are the alternatives.
    One view is `read_batch`. `stack` decodes the views as one padded batch (by default, batches of up to
    STACKED_VIEWS_MAX_BATCH images): the same readings up to float rounding, faster for a few images.
    """
    if len(views) == 1:
        return read_batch(model, views[0][0], views[0][1], beam, attention, temperature)
    batch, device = views[0][0].shape[0], views[0][0].device
    stack = batch <= STACKED_VIEWS_MAX_BATCH if stack is None else stack
    if stack:
        images, mask = _stack_views(views)
        stacked = model.encoder(images, mask)
        encoded = [_rows(stacked, torch.arange(k * batch, (k + 1) * batch, device=device)) for k in range(len(views))]
        greedy = greedy_decode(model, images, mask, temperature=temperature, encoded=stacked)
        greedy_views = [greedy[k * batch : (k + 1) * batch] for k in range(len(views))]
    else:
        encoded = [model.encoder(images, mask) for images, mask in views]
        greedy_views = [
            greedy_decode(model, images, mask, temperature=temperature, encoded=view) for (images, mask), view in zip(views, encoded)
        ]
    candidates: list[dict[tuple[int, ...], None]] = [{} for _ in range(batch)]  # insertion-ordered sets
    for readings in greedy_views:
        for found, reading in zip(candidates, readings):
            found[tuple(reading.digits)] = None
    if beam > 1:
        first_images, first_mask = views[0]
        hypotheses = beam_search(model, first_images, first_mask, beam, temperature=temperature, encoded=encoded[0])
        for found, hyps in zip(candidates, hypotheses):
            for hyp in hyps:
                found[tuple(hyp.digits)] = None
    owner = [b for b, found in enumerate(candidates) for _ in found]
    sequences = [list(seq) for found in candidates for seq in found]
    index = torch.tensor(owner, device=device)
    # Each view's scoring of every candidate: one teacher-forced pass over all views when stacked.
    if stack:
        rows = torch.cat([index + k * batch for k in range(len(views))])
        scored = score_sequences(model, _rows(stacked, rows), sequences * len(views), attention, temperature)
        scored_views = [scored[k * len(sequences) : (k + 1) * len(sequences)] for k in range(len(views))]
    else:
        scored_views = [
            score_sequences(model, _rows(view, index), sequences, return_attention=attention and k == 0, temperature=temperature)
            for k, view in enumerate(encoded)
        ]
    # step_logs[i][j]: the log-probability of candidate i's step j, summed over the views.
    step_logs = [[0.0] * (len(seq) + 1) for seq in sequences]
    for scored in scored_views:
        for logs, reading in zip(step_logs, scored):
            for j, p in enumerate(reading.step_probs):
                logs[j] += math.log(max(p, 1e-30))
    ranked: list[list[int]] = [[] for _ in range(batch)]
    for i, b in enumerate(owner):
        ranked[b].append(i)
    for ranking in ranked:
        ranking.sort(key=lambda i: -sum(step_logs[i]))
    answers = [ranking[0] for ranking in ranked]
    first_view = scored_views[0]  # with its attention, if asked
    readings = [
        Reading(sequences[i], [math.exp(log / len(views)) for log in step_logs[i]], first_view[i].attention, first_view[i].grid)
        for i in answers
    ]
    alternatives = [
        [BeamHypothesis(sequences[i], sum(step_logs[i]) / len(views)) for i in ranking[:beam]] if beam > 1 else []
        for ranking in ranked
    ]
    return list(zip(readings, alternatives))
