"""Distillation end to end: a deeper, wider teacher trained and saved by ``mcore train``, then a
student distilled from it, checked against a hand computation, under TP2 (with sequence
parallelism) and PP2 against one process, with the teacher frozen; every ``[kd]`` knob, a
Hugging Face teacher, the errors, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mcore.core import McoreError, PluginManager, hookimpl, load_config
from mcore.core.testing import run_ranks
from mcore.core.training.loop import train
from mcore.core.training.trainer import setup_trainer
from mcore.distill.stage import find_stage

BIN = Path(sys.executable).parent
STEPS = 3
STUDENT = {"model.num-layers": "2", "model.hidden-size": "32", "model.num-attention-heads": "4"}
TEACHER = {"model.num-layers": "4", "model.hidden-size": "48", "model.num-attention-heads": "4"}


def _config(cache: str, model: dict[str, str] = STUDENT, **overrides: str):
    base = {
        "train.train-iters": str(STEPS),
        "train.micro-batch-size": "2",
        "train.global-batch-size": "4",
        "train.seq-length": "32",
        "data.max-bytes": "100000",
        "data.cache-dir": cache,
        "optimizer.lr": "3e-3",
        "logger.log-interval": "1",
        **model,
    }
    return load_config(overrides={**base, **overrides})


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> tuple[str, str]:
    """(data cache, checkpoint) of a 4-layer, 48-wide teacher trained a few steps."""
    cache = str(tmp_path_factory.mktemp("cache"))
    save = tmp_path_factory.mktemp("teacher") / "run"
    train(_config(cache, TEACHER, **{"train.train-iters": "4", "checkpoint.save": str(save)}))
    return cache, str(save)


def _built(config):
    """A Trainer with its model built (the hooks ran): what a run has before its first step."""
    manager = PluginManager().load_entry_points()
    trainer = setup_trainer(config, manager)
    trainer.build()
    return trainer


def _batch(trainer, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    vocab = trainer.tokenizer.vocab_size
    tokens = torch.randint(0, vocab, (2, 33), generator=gen)
    mask = torch.ones(2, 32)
    mask[1, 20:] = 0
    positions = torch.arange(32).expand(2, 32)
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask,
            "position_ids": positions}  # fmt: skip


def _terms(trainer, batch):
    """Forward the built chunk on ``batch`` and take the objective, as the loop does."""
    (model,) = trainer.chunks
    per_token = model(batch["tokens"], position_ids=batch["position_ids"],
                      labels=batch["labels"], loss_mask=batch["loss_mask"])  # fmt: skip
    lm = (per_token * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    return trainer.objective(model, batch, lm)


def _hand_kl_loss(student_logits, teacher_logits, mask, t: float) -> torch.Tensor:
    log_ps = F.log_softmax(student_logits.double() / t, -1)
    log_pt = F.log_softmax(teacher_logits.double() / t, -1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)  # [b, s]
    return t * t * (kl * mask).sum() / mask.sum()


def test_the_terms_equal_a_hand_computation(teacher) -> None:
    cache, ckpt = teacher
    config = _config(cache, **{"kd.teacher-load": ckpt, "kd.logit-temperature": "2.0",
                               "kd.kd-loss-scale": "0.7", "kd.intermediate-pairs": "1:3",
                               "kd.intermediate-loss-scale": "0.5"})  # fmt: skip
    trainer = _built(config)
    stage = find_stage(trainer.chunks[0])
    student, teacher_model = stage.module, stage.teacher
    batch = _batch(trainer)
    kept = {}
    student.layers["1"].register_forward_hook(lambda m, a, out: kept.__setitem__("s", out))
    teacher_model.layers["3"].register_forward_hook(lambda m, a, out: kept.__setitem__("t", out))
    total, logged = _terms(trainer, batch)
    with torch.no_grad():
        s_logits = student(batch["tokens"], position_ids=batch["position_ids"])  # [b, s, V]
        t_logits = teacher_model(batch["tokens"], position_ids=batch["position_ids"])
        logits = _hand_kl_loss(s_logits, t_logits, batch["loss_mask"], 2.0)
        projected = kept["s"] @ student.kd_projections["1_3"].weight.t()  # [s, b, 48]
        cosine = (projected * kept["t"]).sum(-1) / (projected.norm(dim=-1) * kept["t"].norm(dim=-1))
        layer = (1 - cosine).mean()
    assert logged["kd/logits"].item() == pytest.approx(0.7 * logits.item(), rel=1e-5)
    assert logged["kd/layer_1_3"].item() == pytest.approx(0.7 * 0.5 * layer.item(), rel=1e-5)
    assert total.item() == pytest.approx(
        logged["lm_loss"].item() + logged["kd/logits"].item() + logged["kd/layer_1_3"].item()
    )
    assert logged["lm_loss"].item() > 0 and logits.item() > 0.01  # a real gap to close

    # mse compares the same hidden states by their squared difference.
    mse = _built(_config(cache, **{"kd.teacher-load": ckpt, "kd.intermediate-pairs": "1:3",
                                   "kd.intermediate-loss": "mse"}))  # fmt: skip
    mse_stage = find_stage(mse.chunks[0])
    mse_stage.module.layers["1"].register_forward_hook(lambda m, a, o: kept.__setitem__("s", o))
    mse_stage.teacher.layers["3"].register_forward_hook(lambda m, a, o: kept.__setitem__("t", o))
    _, logged = _terms(mse, batch)
    with torch.no_grad():
        projected = kept["s"] @ mse_stage.module.kd_projections["1_3"].weight.t()
        expected = (projected - kept["t"]).pow(2).mean()
    assert logged["kd/layer_1_3"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_balance_and_distillation_only(teacher) -> None:
    cache, ckpt = teacher
    batch = None
    dynamic = _built(_config(cache, **{"kd.teacher-load": ckpt, "kd.dynamic-loss-balance": "true",
                                       "kd.kd-loss-scale": "0.25",
                                       "kd.intermediate-pairs": "0:1,1:3"}))  # fmt: skip
    batch = _batch(dynamic)
    _, logged = _terms(dynamic, batch)
    layers = [logged["kd/layer_0_1"].item(), logged["kd/layer_1_3"].item()]
    # Each layer term is rescaled to the logits term; the sum to 0.25 x the LM loss.
    assert layers == pytest.approx([logged["kd/logits"].item()] * 2, rel=1e-5)
    assert logged["kd/logits"].item() + sum(layers) == pytest.approx(
        0.25 * logged["lm_loss"].item(), rel=1e-5
    )
    only = _built(_config(cache, **{"kd.teacher-load": ckpt, "kd.skip-lm-loss": "true"}))
    total, logged = _terms(only, batch)
    assert only.lm_loss_weight == 0.0
    assert total.item() == pytest.approx(logged["kd/logits"].item())  # no LM loss in it
    assert logged["lm_loss"].item() > 1.0  # still logged


def test_teacher_precision_and_overrides(teacher) -> None:
    cache, ckpt = teacher
    base = _built(_config(cache, **{"kd.teacher-load": ckpt}))
    batch = _batch(base)
    _, fp32 = _terms(base, batch)
    half = _built(_config(cache, **{"kd.teacher-load": ckpt, "kd.teacher-bf16": "true"}))
    assert {p.dtype for p in find_stage(half.chunks[0]).teacher.parameters()} == {torch.bfloat16}
    _, bf16 = _terms(half, batch)
    assert bf16["kd/logits"].item() == pytest.approx(fp32["kd/logits"].item(), rel=2e-2)
    assert bf16["kd/logits"].item() != fp32["kd/logits"].item()
    # A field of the teacher's [model] config, changed: another teacher, other logits.
    eps = _built(_config(cache, **{"kd.teacher-load": ckpt,
                                   "kd.teacher-model": "{norm_epsilon = 0.5}"}))  # fmt: skip
    assert find_stage(eps.chunks[0]).teacher.config.norm_epsilon == 0.5
    _, changed = _terms(eps, batch)
    assert changed["kd/logits"].item() != pytest.approx(fp32["kd/logits"].item(), rel=1e-3)


class _Frozen:
    """Records the teacher's weights and gradients at the start and the end of the run."""

    def __init__(self) -> None:
        self.seen: dict[str, object] = {}

    def _teacher(self, trainer):
        return trainer.state["mcore-distill"].teacher

    @hookimpl
    def mcore_on_train_start(self, trainer):
        self.seen["start"] = {k: v.clone() for k, v in self._teacher(trainer).state_dict().items()}

    @hookimpl
    def mcore_on_train_end(self, trainer):
        teacher = self._teacher(trainer)
        self.seen["end"] = {k: v.clone() for k, v in teacher.state_dict().items()}
        self.seen["grads"] = [p.grad for p in teacher.parameters()]
        self.seen["requires_grad"] = {p.requires_grad for p in teacher.parameters()}
        self.seen["training"] = teacher.training
        optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        self.seen["optimized"] = any(id(p) in optimized for p in teacher.parameters())


def _kd_overrides(ckpt: str, save: str) -> dict[str, str]:
    return {"kd.teacher-load": ckpt, "kd.intermediate-pairs": "1:3", "checkpoint.save": save}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _distil(rank, world, cache, overrides):
    save = overrides["checkpoint.save"]
    losses = train(_config(cache, **overrides)).losses
    return losses, _rows(Path(save) / "metrics.jsonl") if rank == 0 else None


@pytest.fixture(scope="module")
def single(teacher, tmp_path_factory):
    """One process distilling: its losses, metrics rows, and what the teacher went through."""
    cache, ckpt = teacher
    save = str(tmp_path_factory.mktemp("student") / "run")
    manager = PluginManager().load_entry_points()
    frozen = _Frozen()
    manager.register(frozen, name="frozen")
    result = train(_config(cache, **_kd_overrides(ckpt, save)), manager=manager)
    return result.losses, _rows(Path(save) / "metrics.jsonl"), frozen.seen


def test_the_teacher_is_frozen_and_the_student_learns(single) -> None:
    losses, rows, seen = single
    for key, value in seen["start"].items():
        assert torch.equal(value, seen["end"][key]), key
    assert all(grad is None for grad in seen["grads"])
    assert seen["requires_grad"] == {False} and seen["training"] is False
    assert seen["optimized"] is False
    assert {"lm_loss", "kd/logits", "kd/layer_1_3"} <= set(rows[0])
    kd = [r["kd/logits"] + r["kd/layer_1_3"] for r in rows]
    assert kd[-1] < kd[0]  # the student moves towards the teacher
    assert losses == [r["loss"] for r in rows]


@pytest.mark.parametrize(
    "layout",
    [{"parallel.tp": "2", "parallel.sequence-parallel": "true"}, {"parallel.pp": "2"}],
    ids=["tp2_sp", "pp2"],
)
def test_a_kd_run_under_tp2_and_pp2_equals_the_single_process(
    teacher, single, layout, tmp_path
) -> None:
    cache, ckpt = teacher
    overrides = {**_kd_overrides(ckpt, str(tmp_path / "run")), **layout}
    results = run_ranks(_distil, 2, cache, overrides, backend="gloo", timeout_s=300)
    expected_losses, expected_rows, _ = single
    for losses, _ in results:
        assert losses == pytest.approx(expected_losses, rel=1e-5)
    rows = results[0][1]
    for key in ("lm_loss", "kd/logits", "kd/layer_1_3", "grad_norm"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in expected_rows], rel=1e-4), (
            key
        )


def test_a_hugging_face_teacher(teacher, tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cache, _ = teacher
    student = _built(_config(cache))
    vocab = student.model_config.vocab_size
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96,
                                      num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False))  # fmt: skip
    hf.save_pretrained(tmp_path / "hf")
    trainer = _built(_config(cache, **{"kd.teacher-load": str(tmp_path / "hf")}))
    batch = _batch(trainer)
    _, logged = _terms(trainer, batch)
    stage = find_stage(trainer.chunks[0])
    with torch.no_grad():
        expected = hf(batch["tokens"]).logits
        ours = stage.teacher(batch["tokens"], position_ids=batch["position_ids"])
        s_logits = stage.module(batch["tokens"], position_ids=batch["position_ids"])
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    hand = _hand_kl_loss(s_logits, expected, batch["loss_mask"], 1.0)
    assert logged["kd/logits"].item() == pytest.approx(hand.item(), rel=1e-4)


def _refused(rank, world, cache, overrides):
    try:
        _built(_config(cache, **overrides))
    except McoreError as exc:
        return str(exc)
    return None


def test_bad_teachers_and_pairs_are_refused_before_any_step(teacher, tmp_path) -> None:
    cache, ckpt = teacher
    cases = {
        "kd.teacher_load: the teacher's vocabulary has": {"model.vocab-size": "512"},
        "kd.intermediate_pairs: 2:3 names student layer 2, but the student has 2 layers": {
            "kd.intermediate-pairs": "2:3"
        },
        "kd.intermediate_pairs: 1:4 names teacher layer 4": {"kd.intermediate-pairs": "1:4"},
    }
    for message, overrides in cases.items():
        with pytest.raises(McoreError, match=message.replace("(", r"\(")):
            _built(_config(cache, **{"kd.teacher-load": ckpt, **overrides}))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "common.json").write_text("{not json")
    for path in (tmp_path / "missing", tmp_path / "junk"):
        with pytest.raises(McoreError, match=f"kd.teacher_load: .*{path.name}"):
            _built(_config(cache, **{"kd.teacher-load": str(path)}))
    with pytest.raises(Exception, match="kd.intermediate_pairs: '3' is not a 'STUDENT:TEACHER'"):
        _config(cache, **{"kd.teacher-load": ckpt, "kd.intermediate-pairs": "3"})
    with pytest.raises(Exception, match="kd.skip_lm_loss: is set, but kd.teacher_load is not"):
        _config(cache, **{"kd.skip-lm-loss": "true"})
    # Under PP2 the first stage holds student layer 0: a pair there is refused on every rank.
    messages = run_ranks(_refused, 2, cache,
                         {"kd.teacher-load": ckpt, "kd.intermediate-pairs": "0:3",
                          "parallel.pp": "2"}, backend="gloo")  # fmt: skip
    for message in messages:
        assert "kd.intermediate_pairs: 0:3 is not on the last pipeline stage" in message


def test_mcore_train_distils_from_the_command_line(teacher, tmp_path) -> None:
    cache, ckpt = teacher
    save = tmp_path / "run"
    result = subprocess.run(
        [str(BIN / "mcore"), "train", "--nproc", "1", "--kd.teacher-load", ckpt,
         "--train.train-iters", "2", "--train.micro-batch-size", "2",
         "--train.seq-length", "32", "--data.max-bytes", "100000", "--data.cache-dir", cache,
         "--model.num-layers", "2", "--model.hidden-size", "32",
         "--model.num-attention-heads", "4", "--logger.log-interval", "1",
         "--checkpoint.save", str(save)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and all("kd/logits" in line and "lm_loss" in line for line in lines)
    assert "kd/logits" in _rows(save / "metrics.jsonl")[0]


def test_mcore_plan_counts_the_teachers_weights(teacher) -> None:
    from mcore.parallel.plan.planner import make_plan
    from mcore.parallel.plan.report import render

    cache, ckpt = teacher
    built = _built(_config(cache, **{"kd.teacher-load": ckpt}))
    numel = sum(p.numel() for p in find_stage(built.chunks[0]).teacher.parameters())
    config = _config(cache, **{"kd.teacher-load": ckpt, "model.vocab-size": "384"})
    (role,) = make_plan(config, 1).roles
    assert role.frozen_bytes == 4 * numel  # fp32 weights, no gradients, no optimizer state
    without = make_plan(_config(cache, **{"model.vocab-size": "384"}), 1).roles[0]
    assert role.total_bytes == without.total_bytes + role.frozen_bytes
    half = make_plan(_config(cache, **{"kd.teacher-load": ckpt, "model.vocab-size": "384",
                                       "kd.teacher-bf16": "true"}), 1)  # fmt: skip
    assert half.roles[0].frozen_bytes == 2 * numel
    staged = make_plan(_config(cache, **{"kd.teacher-load": ckpt, "model.vocab-size": "384",
                                         "parallel.pp": "2"}), 2)  # fmt: skip
    first, last = staged.roles
    assert 0 < first.frozen_bytes < role.frozen_bytes and last.frozen_bytes > 0
    assert "frozen" in render(staged) and "frozen" not in render(make_plan(
        _config(cache, **{"model.vocab-size": "384"}), 1))  # fmt: skip


def test_an_moe_teacher_is_built_from_its_checkpoints_config(teacher, tmp_path) -> None:
    """The teacher's [moe] section comes from its checkpoint: a dense student distils from a
    mixture-of-experts teacher without restating its architecture."""
    cache, _ = teacher
    save = tmp_path / "moe-teacher"
    moe = {"moe.num-experts": "4", "moe.router-topk": "2", "checkpoint.save": str(save),
           "train.train-iters": "2"}  # fmt: skip
    train(_config(cache, TEACHER, **moe))
    trainer = _built(_config(cache, **{"kd.teacher-load": str(save)}))
    stage = find_stage(trainer.chunks[0])
    experts = [m for m in stage.teacher.modules() if type(m).__name__ == "MoELayer"]
    assert len(experts) == 4 and not any(
        type(m).__name__ == "MoELayer" for m in stage.module.modules()
    )
    batch = _batch(trainer)
    _, logged = _terms(trainer, batch)
    with torch.no_grad():
        s_logits = stage.module(batch["tokens"], position_ids=batch["position_ids"])
        t_logits = stage.teacher(batch["tokens"], position_ids=batch["position_ids"])
    hand = _hand_kl_loss(s_logits, t_logits, batch["loss_mask"], 1.0)
    assert logged["kd/logits"].item() == pytest.approx(hand.item(), rel=1e-5)
