"""``DynamicInferenceEngine``: continuous batching over a paged KV cache.

One step is a short loop over four objects with narrow interfaces::

    scheduled = scheduler.schedule()            # which requests, how many tokens each
    logits, chunks = runner.execute(scheduled)  # context builds the paged batch; model forward
    sampled = sampler.sample(logits, requests)  # per-request sampling parameters
    request.append_token(...)                   # stop, free finished requests
    deltas = [r.take_delta() for r in requests] # what is new: tokens, logprobs, text

The Python API is what RL drives in-process::

    engine = DynamicInferenceEngine(model, InferenceConfig(...), tokenizer=tokenizer)
    rid = engine.add_request(prompt_token_ids, SamplingParams(max_tokens=64, temperature=1.0))
    while engine.has_unfinished_requests():
        for delta in engine.step(): ...                        # each request's new tokens
    outputs = engine.generate(prompts, SamplingParams(...))   # the same, in one call
    engine.suspend(); ...; engine.resume()                    # lend the KV memory to training
    engine.update_weights(trained_model)                       # refit

``step()`` reports what is new (:class:`~mcore.inference.request.RequestDelta`: tokens,
logprobs and text since the previous step), so its cost does not grow with the length of the
requests; an :class:`~mcore.inference.request.OutputCollector` joins a request's deltas into
its complete :class:`~mcore.inference.request.RequestOutput`, which ``generate()`` returns.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mcore.inference.config import InferenceConfig
from mcore.inference.context import DynamicInferenceContext
from mcore.inference.errors import (
    ContextOverflowError,
    EngineStateError,
    InvalidRequestError,
    RequestId,
)
from mcore.inference.model_runner import ModelRunner
from mcore.inference.pipeline import PipelineStages
from mcore.inference.recurrent_state import RecurrentStateConfig
from mcore.inference.request import OutputCollector, Request, RequestDelta, RequestOutput
from mcore.inference.sampling import Sampler, SamplingParams
from mcore.inference.scheduler import Scheduler
from mcore.inference.speculative import Speculator
from mcore.inference.tokenizer import IncrementalDetokenizer, TextTokenizer
from mcore.models.inference import prepare_for_inference
from mcore.parallel.sharding import is_dtensor

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(config: InferenceConfig) -> torch.device:
    if config.device is not None:
        return torch.device(config.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(config: InferenceConfig, device: torch.device) -> torch.dtype:
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[config.dtype]


@dataclass
class EngineStats:
    """A snapshot of the engine's load, for logs and ``/metrics``."""

    running: int
    waiting: int
    kv_cache_usage: float
    """Fraction of the KV-cache blocks held by requests."""
    kv_cache_blocks: int
    steps: int
    prompt_tokens: int
    """Prompt tokens computed so far (prefix-cache hits excluded)."""
    generated_tokens: int
    preemptions: int
    prefix_cache_hit_tokens: int
    suspended: bool
    state_slots_in_use: int = 0
    """Recurrent-state slots held by running requests (hybrid models)."""
    recurrent_state_bytes: int = 0
    """Bytes of the recurrent-state tensors (0 without sequence-mixer layers, or suspended)."""
    kv_cache_bytes: int = 0
    """Bytes of the KV-cache tensors (0 while suspended)."""
    spec_draft_tokens: int = 0
    """Speculative decoding: tokens drafted and sent to verification."""
    spec_accepted_tokens: int = 0
    """Speculative decoding: drafted tokens the model accepted."""
    spec_acceptance_rate: float = 0.0
    spec_accepted_per_position: list[int] | None = None
    """Accepted drafts by draft position (the k-th draft of a step comes from MTP depth k)."""
    spec_drafted_per_position: list[int] | None = None
    spec_tokens_per_verify_step: float = 0.0
    """Tokens a request produced per step that verified its drafts (1 + accepted drafts)."""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class DynamicInferenceEngine:
    """Serves requests on one model with continuous batching.

    ``model`` is a ``GPTModel`` (or anything with ``forward_paged`` and ``kv_cache_specs``); it
    is moved to the configured device and dtype and put in inference mode. A hybrid model's
    ``recurrent_state_specs()`` (Mamba-2, gated delta net layers) size the per-request state
    slots kept next to the KV cache (``state_config``); such models run without prefix caching.
    ``tokenizer`` (a :class:`~mcore.inference.tokenizer.TextTokenizer`) is optional: with it,
    prompts may be text, outputs carry text, stop strings work and its end-of-sequence ids stop
    requests. ``vocab_size`` limits sampling to the first ids (a vocabulary padded for the
    model; by default the tokenizer's size when it is smaller than the model's).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: InferenceConfig | None = None,
        *,
        tokenizer: TextTokenizer | None = None,
        eos_token_ids: Sequence[int] | None = None,
        vocab_size: int | None = None,
    ) -> None:
        self.config = config = (config or InferenceConfig()).checked()
        if config.max_tokens is not None and config.max_tokens < config.max_requests:
            raise InvalidRequestError(
                f"inference.max_tokens ({config.max_tokens}) must be >= inference.max_requests "
                f"({config.max_requests}): every running request decodes a token each step",
                field="max_tokens",
            )
        self.device = resolve_device(config)
        self.dtype = resolve_dtype(config, self.device)
        # A GPTModel, or anything with forward_paged and kv_cache_specs: typed loosely.
        self.model: Any = prepare_for_inference(model.to(self.device, self.dtype))
        model_config = getattr(model, "config", None)
        longest = getattr(model_config, "max_position_embeddings", None)
        self.max_sequence_length = min(config.max_sequence_length, longest or 2**31)
        self.tokenizer = tokenizer
        eos = set(eos_token_ids if eos_token_ids is not None else ())
        if eos_token_ids is None and tokenizer is not None:
            eos = set(tokenizer.eos_token_ids)
        self.eos_token_ids = frozenset(eos)
        self.state_config = RecurrentStateConfig.from_model(
            self.model, max_requests=config.max_requests, dtype=self.dtype
        )
        """The recurrent-state memory of a hybrid model (None: no sequence-mixer layers)."""
        if self.state_config is not None:
            log.info("recurrent state: %s", self.state_config.describe())
        parallel_state = getattr(self.model, "parallel_state", None)
        self.stages = None
        """This rank's pipeline stage, when the model is split over stages."""
        if parallel_state is not None and parallel_state.pp_size > 1:
            self.stages = PipelineStages(parallel_state)
        self.speculator = None
        """Speculative decoding with the model's MTP depths (None: off)."""
        if config.num_speculative_tokens:
            self.speculator = Speculator(self.model, config.num_speculative_tokens)
            if config.enable_cuda_graph:
                log.info("speculative decoding runs eagerly: CUDA graphs are off")
                config = dataclasses.replace(config, enable_cuda_graph=False)
        self.context = self._build_context(config)
        self.scheduler = Scheduler(
            self.context.kv,
            max_requests=config.max_requests,
            max_tokens=config.max_tokens,
            state_slots=self.context.state_slots,
        )
        self.runner = ModelRunner(self.model, self.context, config, stages=self.stages)
        model_vocab = getattr(model_config, "vocab_size", None)
        if vocab_size is None and tokenizer is not None and model_vocab:
            # Rows past the tokenizer's ids (a vocabulary padded for the matmuls) decode to
            # nothing: never sample them.
            vocab_size = tokenizer.vocab_size if tokenizer.vocab_size < model_vocab else None
        self.sampler = Sampler(device=self.device, seed=config.seed, vocab_size=vocab_size)
        self._requests: dict[RequestId, Request] = {}
        self._ids = itertools.count()
        self._suspended = False
        self._steps = self._prompt_tokens = self._generated = self._preemptions = 0

    def _build_context(self, config: InferenceConfig) -> DynamicInferenceContext:
        """The KV cache (and recurrent states) of this rank's layers; pipeline stages agree
        on the smallest block count, so a request admitted on one stage fits on all."""

        def build(config: InferenceConfig) -> DynamicInferenceContext:
            specs = (
                self.model.kv_cache_specs(mtp=True)
                if self.speculator is not None
                else self.model.kv_cache_specs()
            )
            return DynamicInferenceContext.from_config(
                specs,
                config,
                device=self.device,
                dtype=self.dtype,
                max_sequence_length=self.max_sequence_length,
                state_config=self.state_config,
            )

        context = build(config)
        if self.stages is not None:
            agreed = self.stages.agree_blocks(context.num_blocks)
            if agreed != context.num_blocks:
                del context  # freed before the smaller cache is allocated
                context = build(dataclasses.replace(config, kv_cache_blocks=agreed))
        return context

    # -- requests -----------------------------------------------------------------------------

    def add_request(
        self,
        prompt: Sequence[int] | str,
        sampling_params: SamplingParams | None = None,
        *,
        request_id: RequestId | None = None,
    ) -> RequestId:
        """Queue a request; returns its id. Raises ``InvalidRequestError`` (a bad prompt or
        parameter, naming it) or ``ContextOverflowError`` (it can never fit) and queues
        nothing."""
        params = sampling_params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(
                f"sampling_params must be SamplingParams, got {type(params).__name__}",
                field="sampling_params",
                request_id=request_id,
            )
        if request_id is None:
            request_id = next(self._ids)
            while request_id in self._requests:
                request_id = next(self._ids)
        elif request_id in self._requests:
            raise InvalidRequestError(
                "a live request already has this id", field="request_id", request_id=request_id
            )
        prompt_ids = self._prompt_ids(prompt, request_id)
        max_new = self._check_fits(len(prompt_ids), params, request_id)
        wanted = params.num_speculative_tokens
        most = self.config.num_speculative_tokens
        if wanted and wanted > most:
            raise InvalidRequestError(
                f"num_speculative_tokens is {wanted}, but this engine drafts at most {most} "
                "token(s) per step (inference.num_speculative_tokens, bounded by the model's "
                "multi-token-prediction depths)",
                field="num_speculative_tokens",
                request_id=request_id,
            )
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError(
                "stop strings need a tokenizer; give the engine one or use stop_token_ids",
                field="stop",
                request_id=request_id,
            )
        detokenizer = None
        if self.tokenizer is not None:
            detokenizer = IncrementalDetokenizer(
                self.tokenizer,
                prompt_ids,
                stop=params.stop,
                skip_special_tokens=params.skip_special_tokens,
            )
        generator = None if params.seed is None else self.sampler.request_generator(params.seed)
        request = Request(
            request_id,
            prompt_ids,
            params,
            max_new_tokens=max_new,
            eos_token_ids=self.eos_token_ids,
            generator=generator,
            detokenizer=detokenizer,
        )
        self._requests[request_id] = request
        self.scheduler.add(request)
        return request_id

    def _prompt_ids(self, prompt: Sequence[int] | str, request_id: RequestId) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError(
                    "a text prompt needs a tokenizer; pass token ids or give the engine one",
                    field="prompt",
                    request_id=request_id,
                )
            ids = self.tokenizer.encode(prompt)
        else:
            try:
                ids = [int(t) for t in prompt]
            except (TypeError, ValueError):
                raise InvalidRequestError(
                    "the prompt must be text or a list of token ids",
                    field="prompt",
                    request_id=request_id,
                ) from None
        if not ids:
            raise InvalidRequestError("the prompt is empty", field="prompt", request_id=request_id)
        vocab = getattr(getattr(self.model, "config", None), "vocab_size", None) or 2**62
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(
                f"prompt token ids must lie in [0, {vocab}); got {bad[:5]}",
                field="prompt",
                request_id=request_id,
            )
        return ids

    def _check_fits(self, prompt_len: int, params: SamplingParams, request_id: RequestId) -> int:
        """The most tokens the request may generate; raises if it can never run."""
        longest = self.max_sequence_length
        cache_tokens = self.context.kv.pool.num_usable * self.context.block_size
        if prompt_len >= longest:
            raise ContextOverflowError(
                f"the prompt has {prompt_len} tokens; the engine runs sequences of at most "
                f"{longest} (inference.max_sequence_length), prompt and completion together",
                request_id=request_id,
                tokens=prompt_len,
                limit=longest,
            )
        if prompt_len >= cache_tokens:
            raise ContextOverflowError(
                f"the prompt has {prompt_len} tokens but the whole KV cache holds "
                f"{cache_tokens}; raise inference.buffer_size_gb or kv_cache_blocks",
                request_id=request_id,
                tokens=prompt_len,
                limit=cache_tokens,
            )
        if params.max_tokens is None:
            return min(longest, cache_tokens) - prompt_len
        total = prompt_len + params.max_tokens
        if total > longest:
            raise ContextOverflowError(
                f"{prompt_len} prompt tokens + max_tokens {params.max_tokens} = {total} exceeds "
                f"inference.max_sequence_length ({longest})",
                request_id=request_id,
                tokens=total,
                limit=longest,
            )
        if total > cache_tokens:
            raise ContextOverflowError(
                f"{prompt_len} prompt tokens + max_tokens {params.max_tokens} = {total} exceeds "
                f"what the whole KV cache holds ({cache_tokens} tokens)",
                request_id=request_id,
                tokens=total,
                limit=cache_tokens,
            )
        return params.max_tokens

    def abort(self, request_id: RequestId) -> RequestDelta | None:
        """Stop a request now; returns its last delta (``finish_reason`` ``abort``, with any
        text held back until then), or None if no live request has this id."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return None
        self.scheduler.finish(request)
        request.finish("abort")
        return request.take_delta()

    idle_poll_s: float = 0.5
    """How often a driver calls :meth:`idle` while there is nothing to step."""

    def idle(self) -> bool:
        """Called by a driver (``AsyncInferenceEngine``) while it has nothing to step; returns
        whether it computed something, so the driver should call again at once. A replica's
        leader keeps its followers in touch here (``ReplicaEngine``); an expert-parallel rank
        joins its group's steps (``ExpertParallelEngine``)."""
        return False

    def close(self) -> None:
        """Release what this engine shares with other ranks (a driver calls it when it shuts
        the engine down); nothing for an engine of its own."""

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    # -- the step -----------------------------------------------------------------------------

    def step(self) -> list[RequestDelta]:
        """Run one step; returns a delta for each request that got a token: the token, its
        logprobs and the text it completed (see :class:`~mcore.inference.request.RequestDelta`).
        """
        if self._suspended:
            raise EngineStateError("the engine is suspended: call resume() before step()")
        return self._run(self.scheduler.schedule())

    def _run(self, scheduled: Any) -> list[RequestDelta]:
        """Compute what ``scheduled`` (the scheduler's choice for this step) asks for, sample,
        and record the tokens."""
        self._preemptions += len(scheduled.preempted)
        if not scheduled.chunks:
            return []
        if self.speculator is not None:
            return self.speculator.run(self, scheduled.chunks)
        logits, sampling = self.runner.execute(scheduled.chunks)
        self._steps += 1
        for chunk in scheduled.chunks:
            self._computed(chunk, chunk.num_tokens)
            self.context.kv.commit(chunk.request)
        if not sampling:
            return []
        requests = [c.request for c in sampling]
        if self.stages is None:
            assert logits is not None  # a whole model returns them
            sampled = self.sampler.sample(logits, requests)
        else:  # the last stage samples (it alone has logits); every stage records the same
            mine = self.sampler.sample(logits, requests) if logits is not None else None
            sampled = self.stages.share(mine)
        deltas = []
        for i, request in enumerate(requests):
            self._append(
                request, sampled.token_ids[i], sampled.logprobs[i], sampled.top_logprobs[i]
            )
            deltas.append(self._delta(request))
        return deltas

    def _computed(self, chunk: Any, num_tokens: int) -> None:
        """Count ``num_tokens`` of ``chunk`` as computed (and its prompt tokens among them)."""
        request = chunk.request
        request.num_computed_tokens += num_tokens
        if chunk.start < request.num_prompt_tokens:
            self._prompt_tokens += min(num_tokens, request.num_prompt_tokens - chunk.start)

    def _append(
        self, request: Request, token: int, logprob: float | None, top: dict[int, float] | None
    ) -> None:
        """Record a generated token; the request finishes at max_sequence_length too."""
        request.append_token(token, logprob, top)
        self._generated += 1
        if not request.finished and request.num_tokens >= self.max_sequence_length:
            request.finish("length")

    def _delta(self, request: Request) -> RequestDelta:
        """The request's delta for this step; a finished request leaves the engine."""
        if request.finished:
            self.scheduler.finish(request)
            del self._requests[request.request_id]
        return request.take_delta()

    def generate(
        self,
        prompts: Sequence[Sequence[int] | str],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run ``prompts`` to completion; returns their final outputs in order.

        ``sampling_params`` is one for all prompts or one per prompt. Other requests already
        in the engine keep running alongside.
        """
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise InvalidRequestError(
                    f"{len(prompts)} prompts but {len(params)} sampling parameters",
                    field="sampling_params",
                )
        added: list[RequestId] = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                added.append(self.add_request(prompt, p))
        except Exception:
            for rid in added:
                self.abort(rid)
            raise
        collectors = {rid: OutputCollector() for rid in added}
        unfinished = len(added)
        while unfinished:
            for delta in self.step():
                collector = collectors.get(delta.request_id)
                if collector is not None:
                    collector.add(delta)
                    unfinished -= delta.finished
        return [collectors[rid].output() for rid in added]

    # -- suspend / resume and weights --------------------------------------------------------

    @property
    def suspended(self) -> bool:
        return self._suspended

    def suspend(self, mode: str | None = None) -> None:
        """Free the KV cache and recurrent states (and the CUDA graphs over them); every
        request stays, with its tokens, sampling state and generator, until :meth:`resume`.

        ``mode`` (default ``inference.suspend_mode``): ``offload`` copies the blocks and state
        slots in use to host memory and back, so generation continues bit for bit;
        ``recompute`` keeps no KV or state and recomputes every request's tokens after resume
        (same tokens, up to the rounding of a batched prefill against token-by-token decoding).
        """
        mode = mode or self.config.suspend_mode
        if mode not in ("offload", "recompute"):
            raise InvalidRequestError(
                f"suspend mode must be 'offload' or 'recompute', got {mode!r}",
                field="suspend_mode",
            )
        if self._suspended:
            return
        self.runner.release_graphs()
        if mode == "recompute":
            self.scheduler.preempt_all()
            self.context.kv.reset_prefix_cache()
        self.context.suspend(offload=mode == "offload")
        self._suspended = True

    def resume(self) -> None:
        """Reallocate the KV cache (restoring offloaded blocks) and recapture CUDA graphs."""
        if not self._suspended:
            return
        self.context.resume()
        self.runner.recapture_graphs()
        self._suspended = False

    @torch.no_grad()
    def update_weights(
        self, weights: torch.nn.Module | Mapping[str, torch.Tensor], *, strict: bool = True
    ) -> None:
        """Copy new weights into the engine's model in place (refit after a training step).

        ``weights`` is a model of the same architecture or its ``state_dict()`` (mcore names;
        fully sharded tensors are gathered). The prefix cache is cleared, so no request reuses
        keys/values of the old weights; requests in flight keep theirs, and their recurrent-state
        slots. CUDA graphs stay valid (the parameters keep their storage).
        """
        state = weights.state_dict() if isinstance(weights, torch.nn.Module) else dict(weights)
        own = self.model.state_dict()
        unknown = sorted(set(state) - set(own))
        if unknown:
            raise InvalidRequestError(
                f"update_weights: the model has no parameters named {unknown[:5]}",
                field="weights",
            )
        missing = sorted(k for k in own if k not in state and not k.endswith("inv_freq"))
        if strict and missing:
            raise InvalidRequestError(
                f"update_weights: missing {missing[:5]} (pass strict=False for a partial update)",
                field="weights",
            )
        for name, value in state.items():
            value = value.full_tensor() if is_dtensor(value) else value
            target = own[name]
            if tuple(value.shape) != tuple(target.shape):
                raise InvalidRequestError(
                    f"update_weights: {name} has shape {tuple(value.shape)}, the model's is "
                    f"{tuple(target.shape)}",
                    field="weights",
                )
            target.copy_(value)
        self.context.kv.reset_prefix_cache()

    # -- introspection ------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        kv, slots = self.context.kv, self.context.state_slots
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_cache_usage=kv.usage(),
            kv_cache_blocks=kv.num_blocks,
            steps=self._steps,
            prompt_tokens=self._prompt_tokens,
            generated_tokens=self._generated,
            preemptions=self._preemptions,
            prefix_cache_hit_tokens=kv.prefix_hits,
            suspended=self._suspended,
            state_slots_in_use=0 if slots is None else slots.num_in_use,
            recurrent_state_bytes=self.context.state_memory_bytes(),
            kv_cache_bytes=self.context.kv_memory_bytes(),
            **(self.speculator.stats.to_dict() if self.speculator is not None else {}),
        )

    def get_request(self, request_id: RequestId) -> Request | None:
        return self._requests.get(request_id)
