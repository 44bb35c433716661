"""The ``[rl]`` config section: rollouts, the GRPO objective, packing, refit and lag.

Names follow Megatron-RL's arguments without the ``grpo-``/``rl-`` prefix where one exists
(``group_size`` is ``--grpo-group-size``, ``clamp_eps_lower`` is ``--grpo-clamp-eps-lower``);
each field's docstring names the verl / TRL equivalent a user may know better.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mcore.core import ConfigErrors, component

DEFAULT_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz +-*/=()<>.,:;?!#\n"


@dataclass(kw_only=True)
class RLConfig:
    """GRPO post-training: rollouts on the inference engine, group advantages, packed updates."""

    # --- what to roll out -------------------------------------------------------------------
    env: str = component("rl_env", "string_copy")
    """Environment by registry name (arithmetic, string_copy, string_reverse, math_answer)."""
    agent: str = component("rl_agent", "single_turn")
    """Agent by registry name (single_turn, multi_turn)."""
    env_data_path: str | None = None
    """JSONL of problems for environments that read them (math_answer: one object per line
    with 'question' and 'answer'); unset uses the environment's shipped sample set."""
    env_max_operand: int = 20
    """arithmetic: operands are drawn from 0..this."""
    env_min_length: int = 2
    """string_copy / string_reverse: shortest string."""
    env_max_length: int = 4
    """string_copy / string_reverse: longest string."""
    env_alphabet: str = "abcd"
    """string_copy / string_reverse: characters the strings are made of."""
    max_turns: int = 2
    """multi_turn agent: turns at most (the environment may end the episode sooner)."""
    char_alphabet: str = DEFAULT_ALPHABET
    """Characters of the 'char' tokenizer (data.tokenizer = 'char'), one id each."""

    # --- rollouts ---------------------------------------------------------------------------
    prompts_per_step: int = field(default=8, metadata={"megatron": "--grpo-prompts-per-step"})
    """Prompts (groups) per training step over all ranks (Megatron-RL --grpo-prompts-per-step;
    verl data.train_batch_size)."""
    group_size: int = field(default=8, metadata={"megatron": "--grpo-group-size"})
    """Completions sampled per prompt; advantages are relative within a group (Megatron-RL
    --grpo-group-size; verl rollout.n; TRL num_generations)."""
    max_new_tokens: int = 128
    """Longest completion of one turn (verl rollout.response_length)."""
    temperature: float = field(default=1.0, metadata={"megatron": "--grpo-default-temperature"})
    """Sampling temperature of rollouts; the trained policy is softmax(logits / temperature)."""
    top_p: float = field(default=1.0, metadata={"megatron": "--grpo-default-top-p"})
    """Nucleus sampling of rollouts (1 keeps every token)."""
    top_k: int = 0
    """Top-k sampling of rollouts (0 keeps every token)."""

    # --- GRPO -------------------------------------------------------------------------------
    normalize_advantages_by_std: bool = True
    """Divide group-centred rewards by the group's standard deviation (GRPO); off gives
    Dr.GRPO's unbiased advantages (verl norm_adv_by_std_in_grpo)."""
    advantage_epsilon: float = 1e-6
    """Added to the group standard deviation before dividing."""
    filter_groups_with_same_reward: bool = field(
        default=False, metadata={"megatron": "--grpo-filter-groups-with-same-reward"}
    )
    """Leave out groups whose rewards do not vary: their advantages are all 0 (Megatron-RL
    --grpo-filter-groups-with-same-reward). They are counted either way."""
    clamp_eps_lower: float = field(default=0.2, metadata={"megatron": "--grpo-clamp-eps-lower"})
    """Lower clip of the policy ratio: 1 - this (Megatron-RL --grpo-clamp-eps-lower; verl
    clip_ratio_low)."""
    clamp_eps_upper: float = field(default=0.2, metadata={"megatron": "--grpo-clamp-eps-upper"})
    """Upper clip of the policy ratio: 1 + this; raise it for DAPO's clip-higher
    (--grpo-clamp-eps-upper; verl clip_ratio_high)."""
    dual_clip_c: float | None = None
    """Dual-clip PPO: for negative advantages, the loss is capped at c * |A| (c > 1; verl
    clip_ratio_c); unset disables it."""
    kl_beta: float = field(default=0.0, metadata={"megatron": "--grpo-kl-beta"})
    """Weight of the KL penalty against the frozen initial policy; > 0 keeps a reference copy
    of the model (--grpo-kl-beta; verl kl_loss_coef; TRL beta)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """Per-token KL estimator (Schulman): k1 = log r, k2 = (log r)^2 / 2, k3 = 1/r - 1 + log r
    with r = pi / pi_ref (verl kl_loss_type low_var_kl is k3)."""
    entropy_coeff: float = field(default=0.0, metadata={"megatron": "--grpo-entropy-term-weight"})
    """Weight of the entropy bonus (--grpo-entropy-term-weight; verl entropy_coeff)."""
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "dr_grpo"] = "token_mean"
    """How per-token losses become the step's loss: the mean over every completion token of
    the global batch (DAPO, verl token-mean); the mean over sequences of each sequence's
    token mean (the original GRPO, verl seq-mean-token-mean); or the sum over tokens divided
    by sequences x max_new_tokens x max_turns (Dr.GRPO, verl seq-mean-token-sum-norm)."""
    importance_sampling_correction: bool = field(
        default=True, metadata={"megatron": "--rl-inference-logprobs-is-correction"}
    )
    """Weight each token by pi_old / pi_rollout, truncated, to correct for the inference engine
    sampling from slightly other (or older) weights than training computes with (Megatron-RL
    --rl-inference-logprobs-is-correction; verl tis_imp_ratio_cap)."""
    importance_sampling_cap: float = field(
        default=2.0, metadata={"megatron": "--rl-importance-sampling-truncation-coef"}
    )
    """Truncation of the importance weight (--rl-importance-sampling-truncation-coef)."""
    grpo_iterations: int = field(default=1, metadata={"megatron": "--grpo-iterations"})
    """Passes over each step's rollouts (--grpo-iterations; verl ppo_epochs)."""
    num_minibatches: int = 1
    """Optimizer steps per pass: the rollouts are split into this many mini-batches of whole
    groups (verl: train_batch_size / ppo_mini_batch_size)."""

    # --- packing ----------------------------------------------------------------------------
    use_sequence_packing: bool = field(
        default=True, metadata={"megatron": "--rl-use-sequence-packing"}
    )
    """Pack rollouts into rows of packing_bin_size tokens, each attending within itself
    (--rl-use-sequence-packing); off puts one rollout per row, padded."""
    packing_bin_size: int | None = field(
        default=None, metadata={"megatron": "--rl-sequence-packing-bin-size"}
    )
    """Tokens per packed row (--rl-sequence-packing-bin-size); unset means train.seq_length."""

    # --- the loop ---------------------------------------------------------------------------
    max_generation_lag: int = 0
    """Refit the engine only every (lag + 1) steps: rollouts may come from weights up to this
    many steps old (off-policy; the importance-sampling correction accounts for it)."""
    partial_rollouts: bool = field(default=False, metadata={"megatron": "--rl-partial-rollouts"})
    """Keep twice this rank's groups in flight and train each step on the first to finish;
    the others continue in the engine into later steps, under newer weights (each token keeps
    the log-prob it was sampled with, which the importance-sampling correction uses), so no
    step waits for the longest generation (--rl-partial-rollouts)."""
    rollout_tokens_per_step: int | None = None
    """With partial_rollouts: stop generating once a rank produced this many tokens in a step
    and has a finished group (the step then trains on fewer groups); unset: no cap."""
    finetune: bool = field(default=False, metadata={"megatron": "--finetune"})
    """Start from checkpoint.load's weights at step 0, with a fresh optimizer state and LR
    schedule (Megatron's --finetune): how RL starts from a pretrained or SFT checkpoint. The
    frozen reference is those weights too. A run resumed from its own checkpoint.save
    continues in full (step, optimizer, schedule) whatever this says."""
    use_checkpoint_args: bool = field(default=False, metadata={"megatron": "--use-checkpoint-args"})
    """Take the model's architecture (the ``[model]`` section) from the checkpoint
    ``checkpoint.load`` names, as Megatron's --use-checkpoint-args: with ``mcore ckpt
    import-hf`` and ``rl.finetune``, how a Hugging Face model is post-trained without
    spelling out its config."""
    sft_iters: int = 0
    """Supervised warm-up before GRPO: this many optimizer steps of cross-entropy on the
    environment's demonstrations (correct answers), so a tiny model from scratch starts GRPO
    with a policy that sometimes succeeds. Runs once, at the start of a new run (a resumed
    run has it in its weights); the frozen reference is the warmed-up policy."""
    sft_batch_size: int | None = None
    """Demonstrations per warm-up step over all ranks; unset means prompts_per_step x
    group_size (a GRPO step's episodes)."""
    sft_lr: float | None = None
    """Learning rate of the warm-up steps; unset means optimizer.lr (the GRPO schedule is not
    stepped by them)."""
    engine_layout: Literal["training", "whole"] = "training"
    """Where the rollout engines live. 'training': in the training layout's tensor and
    pipeline parallelism, one engine per data-parallel rank (its TP and PP ranks generate
    together), and refit copies each rank's own shards, so no rank holds a second full copy of
    the model; layouts the engine cannot run yet (virtual pipeline stages, experts split over
    data-parallel ranks) fall back to 'whole' and log why. 'whole': every rank's engine holds
    the whole model (more engines at once, each the model's full size) and refit assembles
    every tensor on every rank."""
    inference_max_requests: int | None = None
    """Requests the engine runs at once; unset means this engine's share of a step's rollouts
    (inference.max_requests when that is larger)."""

    def validate(self, errors: ConfigErrors) -> None:
        for name in (
            "prompts_per_step",
            "max_new_tokens",
            "grpo_iterations",
            "num_minibatches",
            "max_turns",
            "env_max_operand",
            "env_min_length",
        ):
            if getattr(self, name) < 1:
                errors.add(name, f"must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            errors.add("group_size", "must be >= 2: a group of one has no relative advantage")
        if self.temperature <= 0:
            errors.add("temperature", f"must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            errors.add("top_p", f"must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            errors.add("top_k", f"must be >= 0 (0 keeps every token), got {self.top_k}")
        for name in ("clamp_eps_lower", "clamp_eps_upper", "kl_beta", "entropy_coeff"):
            if getattr(self, name) < 0:
                errors.add(name, f"must be >= 0, got {getattr(self, name)}")
        if self.clamp_eps_lower >= 1:
            errors.add(
                "clamp_eps_lower",
                f"must be < 1 (the ratio's floor is 1 - it), got {self.clamp_eps_lower}",
            )
        if self.dual_clip_c is not None and self.dual_clip_c <= 1:
            errors.add("dual_clip_c", f"must be > 1 (or unset), got {self.dual_clip_c}")
        if self.importance_sampling_correction and 0 < self.temperature != 1.0:
            errors.add(
                "importance_sampling_correction",
                f"needs rl.temperature = 1 (got {self.temperature}): the engine reports "
                "log-probs of the raw logits, training those of logits / temperature; "
                "turn the correction off to sample at another temperature",
            )
        if self.advantage_epsilon < 0:
            errors.add("advantage_epsilon", f"must be >= 0, got {self.advantage_epsilon}")
        if self.importance_sampling_cap < 1:
            errors.add(
                "importance_sampling_cap", f"must be >= 1, got {self.importance_sampling_cap}"
            )
        if self.num_minibatches > self.prompts_per_step:
            errors.add(
                "num_minibatches",
                f"({self.num_minibatches}) must be <= prompts_per_step ({self.prompts_per_step}):"
                " a mini-batch holds whole groups",
            )
        if self.max_generation_lag < 0:
            errors.add("max_generation_lag", f"must be >= 0, got {self.max_generation_lag}")
        if self.packing_bin_size is not None and self.packing_bin_size < 2:
            errors.add("packing_bin_size", f"must be >= 2, got {self.packing_bin_size}")
        if self.rollout_tokens_per_step is not None:
            if self.rollout_tokens_per_step < 1:
                errors.add(
                    "rollout_tokens_per_step", f"must be >= 1, got {self.rollout_tokens_per_step}"
                )
            if not self.partial_rollouts:
                errors.add("rollout_tokens_per_step", "only applies with rl.partial_rollouts")
        if self.sft_iters < 0:
            errors.add("sft_iters", f"must be >= 0, got {self.sft_iters}")
        if self.sft_batch_size is not None and self.sft_batch_size < 1:
            errors.add("sft_batch_size", f"must be >= 1, got {self.sft_batch_size}")
        if self.sft_lr is not None and self.sft_lr <= 0:
            errors.add("sft_lr", f"must be > 0, got {self.sft_lr}")
        if self.inference_max_requests is not None and self.inference_max_requests < 1:
            errors.add("inference_max_requests", f"must be >= 1, got {self.inference_max_requests}")
        if self.env_max_length < self.env_min_length:
            errors.add(
                "env_max_length",
                f"({self.env_max_length}) must be >= env_min_length ({self.env_min_length})",
            )
        if len(set(self.env_alphabet)) < 2:
            errors.add(
                "env_alphabet", f"needs at least 2 distinct characters, got {self.env_alphabet!r}"
            )
        if not self.char_alphabet or len(set(self.char_alphabet)) != len(self.char_alphabet):
            errors.add("char_alphabet", "must be non-empty with every character once")
