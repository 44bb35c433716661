"""Speculative decoding with the model's multi-token-prediction (MTP) depths.

Each step the engine runs the model once over every scheduled chunk; a decoding request's chunk
holds its last token followed by the tokens drafted for it the step before, so that one forward
scores them all. Verification then keeps the longest run of drafts the model agrees with and
adds one token of its own:

- greedy requests keep draft ``i`` while it is the model's argmax at that row, then take the
  model's argmax at the first disagreement (or after the last draft): exactly the tokens plain
  greedy decoding would produce;
- sampled requests keep draft ``i`` with probability ``min(1, p(d) / q(d))`` (``p`` the
  model's distribution after temperature and filters, ``q`` the one the draft was drawn from),
  and on rejection draw from ``max(p - q, 0)`` renormalised (Leviathan et al., 2023): the
  tokens follow the model's own distribution whatever the drafts.

Keys and values of rejected drafts stay in their cache slots until later tokens overwrite them;
the request's computed count simply stops before them. A hybrid model's recurrent states cannot
step back, so a request whose drafts were not all accepted gets its state slot restored from a
copy taken before the forward and recomputes the chunk's accepted tokens the next step.

Drafting, after verification: MTP depth ``k`` at position ``t`` reads the previous depth's
hidden state at ``t`` and the embedding of token ``t + k``, and keeps its own keys and values in
the paged cache under its layer numbers. Depth 1 runs over every position the step computed
(the main model's hidden states, the now known next tokens), which keeps its cache complete;
depth ``k`` runs over the same rows with tokens ``t + k``, which for the last rows are this
step's drafts (or, past what is known, token 0): those few entries only shape later drafts,
never outputs. Each drafting request's last row gives draft ``k``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mcore.inference.errors import InvalidRequestError
from mcore.inference.request import Request, RequestDelta
from mcore.inference.scheduler import ScheduledChunk

if TYPE_CHECKING:
    from mcore.inference.engine import DynamicInferenceEngine

log = logging.getLogger(__name__)


@dataclass
class SpeculationStats:
    """Drafts proposed and accepted, by draft position (1-based index ``k - 1``)."""

    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    verify_chunks: int = 0
    """Chunks that carried drafts."""
    emitted: int = 0
    """Tokens those chunks produced (accepted drafts plus the model's own)."""

    def record(self, num_drafts: int, num_accepted: int, num_emitted: int) -> None:
        for k in range(num_drafts):
            self.drafted[k] += 1
            self.accepted[k] += k < num_accepted
        self.verify_chunks += 1
        self.emitted += num_emitted

    def to_dict(self) -> dict[str, Any]:
        drafted, accepted = sum(self.drafted), sum(self.accepted)
        return {
            "spec_draft_tokens": drafted,
            "spec_accepted_tokens": accepted,
            "spec_acceptance_rate": accepted / drafted if drafted else 0.0,
            "spec_accepted_per_position": list(self.accepted),
            "spec_drafted_per_position": list(self.drafted),
            "spec_tokens_per_verify_step": self.emitted / self.verify_chunks
            if self.verify_chunks
            else 0.0,
        }


class Speculator:
    """The speculative step of a :class:`DynamicInferenceEngine` (its ``_run`` delegates
    here when ``inference.num_speculative_tokens > 0``)."""

    def __init__(self, model: torch.nn.Module, num_tokens: int) -> None:
        mtp: Any = getattr(model, "mtp", None)
        depth = 0 if mtp is None else mtp.depth
        if depth == 0:
            raise InvalidRequestError(
                f"inference.num_speculative_tokens is {num_tokens}, but the model has no "
                "multi-token-prediction layers to draft with (model.mtp_num_layers is 0, or the "
                "checkpoint carries no MTP weights)",
                field="num_speculative_tokens",
            )
        if num_tokens > depth:
            raise InvalidRequestError(
                f"inference.num_speculative_tokens is {num_tokens}, but the model has "
                f"{depth} multi-token-prediction depth(s): it drafts at most {depth} token(s) "
                "per step",
                field="num_speculative_tokens",
            )
        assert mtp is not None  # depth > 0
        if any(m.mixer is not None for layer in mtp.layers for m in layer.block):
            raise InvalidRequestError(
                "speculative decoding with MTP blocks that hold Mamba or gated-delta-net layers "
                "is not supported (their recurrent state per depth is not kept)",
                field="num_speculative_tokens",
            )
        self.num_tokens = num_tokens
        self.stats = SpeculationStats([0] * num_tokens, [0] * num_tokens)

    def tokens_for(self, request: Request) -> int:
        """How many tokens ``request`` drafts per step."""
        wanted = request.params.num_speculative_tokens
        return self.num_tokens if wanted is None else wanted

    # -- the step -----------------------------------------------------------------------------

    def run(
        self, engine: DynamicInferenceEngine, chunks: list[ScheduledChunk]
    ) -> list[RequestDelta]:
        """Forward ``chunks``, verify their drafts, record the tokens, and draft the next."""
        snapshot = self._snapshot_states(engine, chunks)
        logits, batch, hidden = engine.runner.execute_with_hidden(chunks)
        engine._steps += 1
        for chunk in chunks:
            engine._computed(chunk, chunk.num_tokens - len(chunk.draft))
        target = engine.sampler.limit_vocab(logits) if logits.numel() else logits
        want_logprobs = any(c.request.params.logprobs is not None for c in batch.sample_chunks)
        logprobs = torch.log_softmax(target, dim=-1) if want_logprobs else None
        greedy_ids = target.argmax(dim=-1).tolist() if target.numel() else []
        deltas, rolled_back, row = [], set(), 0
        for chunk in batch.sample_chunks:
            request, m = chunk.request, chunk.num_logits
            rows = range(row, row + m)
            row += m
            tokens = self._verify(engine, chunk, target, rows, greedy_ids)
            accepted = len(tokens) - 1
            if chunk.draft:
                self.stats.record(len(chunk.draft), accepted, len(tokens))
                request.num_computed_tokens += accepted
                if snapshot is not None and accepted < len(chunk.draft):
                    self._restore_state(engine, snapshot, request)
                    request.num_computed_tokens = chunk.start
                    rolled_back.add(id(request))
            request.clear_draft()
            for i, token in enumerate(tokens):
                engine._append(
                    request, token, *_logprobs(logprobs, rows[i], token, request.params.logprobs)
                )
                if request.finished:
                    break
            # Stopped early (a stop token among the accepted drafts): the later drafts' keys
            # and values belong to no token of the request.
            request.num_computed_tokens = min(request.num_computed_tokens, request.num_tokens - 1)
            engine.context.kv.commit(request)
            deltas.append(engine._delta(request))
        for chunk in chunks:  # chunks that computed without sampling (a prefill chunk)
            if not chunk.num_logits:
                engine.context.kv.commit(chunk.request)
        self._draft(engine, chunks, batch, hidden, rolled_back)
        return deltas

    def _verify(
        self,
        engine: DynamicInferenceEngine,
        chunk: ScheduledChunk,
        target: torch.Tensor,
        rows: range,
        greedy_ids: list[int],
    ) -> list[int]:
        """The tokens the chunk produces: accepted drafts, then one of the model's."""
        request, draft = chunk.request, chunk.draft
        if request.params.greedy:
            out = []
            for i, token in enumerate(draft):
                model_token = greedy_ids[rows[i]]
                if model_token != token:
                    return [*out, model_token]
                out.append(token)
            return [*out, greedy_ids[rows[len(draft)]]]
        p = engine.sampler.probs(target[rows.start : rows.stop], [request.params] * len(rows))
        out = []
        if draft:
            q = request_draft_probs(chunk)
            u = engine.sampler.uniform([request] * len(draft))
            for i, token in enumerate(draft):
                p_i, q_i = p[i, token], q[i, token]
                if q_i > 0 and u[i] * q_i <= p_i:
                    out.append(token)
                    continue
                residual = (p[i] - q[i]).clamp(min=0)
                total = residual.sum()
                residual = residual / total if total > 0 else p[i]
                out.append(int(engine.sampler.draw(residual[None], [request])[0]))
                return out
        out.append(int(engine.sampler.draw(p[len(draft)][None], [request])[0]))
        return out

    # -- drafting -----------------------------------------------------------------------------

    def _draft(
        self,
        engine: DynamicInferenceEngine,
        chunks: list[ScheduledChunk],
        batch: Any,
        hidden: torch.Tensor,
        rolled_back: set[int],
    ) -> None:
        """Run the MTP depths over the rows this step computed and give each decoding request
        its drafts for the next step."""
        rows: list[tuple[Request, int, int, int]] = []  # request, start, count, drafts
        for chunk in chunks:
            request = chunk.request
            if request.finished or id(request) in rolled_back or not self.tokens_for(request):
                continue
            count = request.num_computed_tokens - chunk.start
            if count <= 0:
                continue
            decoding = request.num_tokens - request.num_computed_tokens == 1
            drafts = 0
            if decoding:
                left = request.max_new_tokens - len(request.output_token_ids) - 1
                room = engine.max_sequence_length - request.num_tokens
                drafts = max(0, min(self.tokens_for(request), left, room))
            rows.append((request, chunk.start, count, drafts))
        depth = max((d for *_, d in rows), default=0)
        if not depth:
            return
        drafted: dict[int, list[int]] = {id(req): [] for req, *_ in rows}
        probs: dict[int, list[torch.Tensor]] = {id(req): [] for req, *_ in rows}
        # One batch for every depth: the same rows (positions, cache slots, masks); depth k
        # only changes the ids (tokens t + k) and which rows give logits (requests drafting
        # k tokens or more).
        mtp_chunks = [
            ScheduledChunk(request, start, count, token_ids=[0] * count, logits=int(drafts >= 1))
            for request, start, count, drafts in rows
        ]
        mtp_batch = engine.context.build_batch(mtp_chunks)
        paged, device = mtp_batch.paged, hidden.device
        starts = [mtp_batch.first_rows[id(c)] for c in mtp_chunks]
        # Depth 1 reads the main model's hidden states of the same positions.
        target_rows = {id(c.request): batch.first_rows[id(c)] for c in chunks}
        index = torch.empty(paged.num_tokens, dtype=torch.long)
        for (request, _, count, _), row in zip(rows, starts, strict=True):
            first = target_rows[id(request)]
            index[row : row + count] = torch.arange(first, first + count)
        h = hidden.index_select(0, index.to(device))
        for k in range(1, depth + 1):
            ids = torch.zeros(paged.num_tokens, dtype=torch.long)
            sampling, last_rows = [], []
            for (request, start, count, drafts), row in sorted(
                zip(rows, starts, strict=True), key=lambda pair: pair[1]
            ):
                known = drafted[id(request)]
                ids[row : row + count] = torch.tensor(
                    [_token_at(request, known, t + k) for t in range(start, start + count)]
                )
                if drafts >= k:
                    sampling.append(request)
                    last_rows.append(row + count - 1)
            paged.input_ids = ids.to(device)
            paged.logits_rows = torch.tensor(last_rows, dtype=torch.long, device=device)
            logits, h = engine.runner.execute_mtp(paged, h, k, first=k == 1)
            if not sampling:
                continue
            scores = engine.sampler.limit_vocab(logits)
            greedy = scores.argmax(dim=-1).tolist()
            sampled = [i for i, r in enumerate(sampling) if not r.params.greedy]
            if sampled:
                q = engine.sampler.probs(scores[sampled], [sampling[i].params for i in sampled])
                tokens = engine.sampler.draw(q, [sampling[i] for i in sampled]).tolist()
                for j, i in enumerate(sampled):
                    greedy[i] = tokens[j]
                    probs[id(sampling[i])].append(q[j])
            for i, request in enumerate(sampling):
                drafted[id(request)].append(greedy[i])
        for request, *_ in rows:
            request.draft = drafted[id(request)]
            request.draft_probs = torch.stack(probs[id(request)]) if probs[id(request)] else None

    # -- recurrent state ----------------------------------------------------------------------

    def _snapshot_states(
        self, engine: DynamicInferenceEngine, chunks: list[ScheduledChunk]
    ) -> dict[int, tuple[int, dict[int, tuple[torch.Tensor, ...]]]] | None:
        """Copies of the state slots of requests verifying drafts (hybrid models only)."""
        context = engine.context
        if context.states is None or context.state_slots is None:
            return None
        out = {}
        for chunk in chunks:
            if not chunk.draft:
                continue
            slot = context.state_slots.slot(chunk.request.request_id)
            out[id(chunk.request)] = (
                slot,
                {layer: tuple(t[slot].clone() for t in ts) for layer, ts in context.states.items()},
            )
        return out

    def _restore_state(
        self, engine: DynamicInferenceEngine, snapshot: dict, request: Request
    ) -> None:
        slot, saved = snapshot[id(request)]
        states = engine.context.states
        assert states is not None  # the snapshot was of them
        for layer, tensors in states.items():
            for target, value in zip(tensors, saved[layer], strict=True):
                target[slot].copy_(value)


def request_draft_probs(chunk: ScheduledChunk) -> torch.Tensor:
    """The distributions a sampled request's drafts in ``chunk`` were drawn from."""
    probs = chunk.request.draft_probs
    if probs is None or probs.shape[0] < len(chunk.draft):
        raise RuntimeError(
            f"request {chunk.request.request_id!r} has {len(chunk.draft)} sampled drafts but "
            "not the distributions they were drawn from"
        )
    return probs


def _token_at(request: Request, drafts: list[int], position: int) -> int:
    """Token ``position`` of the request: known, else this step's draft, else 0."""
    n = request.num_tokens
    if position < n:
        return request.all_token_ids[position]
    i = position - n
    return drafts[i] if i < len(drafts) else 0


def _logprobs(
    logprobs: torch.Tensor | None, row: int, token: int, want: int | None
) -> tuple[float | None, dict[int, float] | None]:
    """The token's log-probability at ``row`` (the model's raw distribution) and the top
    ``want`` alternatives, when the request asked for them."""
    if want is None or logprobs is None:
        return None, None
    values = logprobs[row]
    top = None
    if want:
        v, i = values.topk(want)
        top = dict(zip(i.tolist(), v.tolist(), strict=True))
    return float(values[token]), top
