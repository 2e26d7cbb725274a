"""Stage semantics: parameter roles, loss functions against references, the layer-wise objective."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mmdistill
from mmdistill.image_vocab import ImageVocabSpec
from mmdistill.objective import (
    DistillObjective,
    TeacherForward,
    kl_per_token,
    layer_mse,
    next_token_ce,
)
from mmdistill.omni_student import add_image_vocabulary
from mmdistill.recipe import LossSpec
from mmdistill.roles import ROLES, parameter_role, set_trainable
from mmdistill.task_lora import LoraSpec


@pytest.fixture(scope="module")
def hybrid(hovle):
    return mmdistill.seed(hovle, attention_layers="0,2").float()


def test_every_parameter_has_the_expected_role(hybrid):
    spec = ImageVocabSpec(hybrid.config.vocab_size, codebook_size=8, grid=2, embed_dim=8)
    omni = add_image_vocabulary(hybrid, spec, LoraSpec())
    names = [n for model in (hybrid, omni) for n, _ in model.named_parameters()]
    roles = {name: parameter_role(name) for name in names}
    assert set(roles.values()) == set(ROLES)
    expected = {
        "layers.1.mixer.z_proj.weight": "ssm",
        "layers.1.mixer.dt_proj.weight": "ssm",
        "layers.1.mixer.dt_bias": "ssm",
        "layers.1.mixer.A_log": "ssm",
        "layers.1.mixer.conv1d.weight": "ssm",
        "layers.1.mixer.conv1d.bias": "ssm",
        "layers.1.mixer.norm_weight": "ssm",
        "layers.1.mixer.c_proj.weight": "qkv",
        "layers.1.mixer.b_proj.weight": "qkv",
        "layers.1.mixer.x_proj.weight": "qkv",
        "layers.1.mixer.out_proj.weight": "out_proj",
        "layers.0.mixer.q_proj.weight": "attention",
        "layers.2.mixer.o_proj.weight": "attention",
        "layers.3.mlp.gate_proj.weight": "mlp",
        "layers.3.input_norm.weight": "norms",
        "layers.3.post_norm.weight": "norms",
        "norm.weight": "norms",
        "lm_head.weight": "embeddings",
        "front.llm_text_embeddings.weight": "embeddings",
        "front.vision_embeddings.patch_embedding.weight": "vision",
        "front.vision_embeddings.position_embedding": "vision",
        "front.pixel_shuffle_proj.0.weight": "vision",
        "layers.1.mixer.z_proj.base_layer.weight": "ssm",
        "layers.1.mixer.c_proj.lora_A.mmu.weight": "lora",
        "layers.3.mixer.dt_proj.lora_B.t2i.weight": "lora",
        "image_vocab.embed.weight": "image_embeddings",
        "image_vocab.projector.0.weight": "image_embeddings",
        "image_vocab.position.weight": "image_embeddings",
        "image_vocab.layout.weight": "image_embeddings",
        "image_vocab.head.weight": "image_head",
    }
    for name, role in expected.items():
        assert roles[name] == role, name
    with pytest.raises(ValueError, match="has no role"):
        parameter_role("front.new_module.weight")


def test_use_D_is_an_ssm_parameter(hovle):
    student = mmdistill.seed(hovle, mixer={"use_D": True})
    assert parameter_role("layers.0.mixer.D") == "ssm"
    assert student.layers[0].mixer.D is not None


def test_set_trainable_freezes_everything_else(hybrid):
    counts = set_trainable(hybrid, ["ssm", "qkv"])
    trainable = {n for n, p in hybrid.named_parameters() if p.requires_grad}
    assert trainable == {
        n for n, _ in hybrid.named_parameters() if parameter_role(n) in ("ssm", "qkv")
    }
    assert counts["ssm"] + counts["qkv"] == sum(
        p.numel() for p in hybrid.parameters() if p.requires_grad
    )


def test_loss_functions_match_references():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    err = ((pred - target) ** 2).mean(-1)
    assert torch.allclose(layer_mse(pred, target, mask), err[mask.bool()].mean())
    assert torch.allclose(layer_mse(pred, target, None), err.mean())

    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    for temp in (1.0, 2.0):
        per_token = (
            F.kl_div(
                F.log_softmax(s / temp, -1),
                F.log_softmax(t / temp, -1),
                log_target=True,
                reduction="none",
            ).sum(-1)
            * temp**2
        )
        assert torch.allclose(kl_per_token(s, t, mask, temp), per_token[mask.bool()].mean())
    assert kl_per_token(t, t, None) == pytest.approx(0.0, abs=1e-6)

    ids = torch.randint(0, 11, (2, 5))
    ids[1, 3] = 7
    targets = ids[:, 1:].clone()
    keep = mask[:, 1:].bool() & mask[:, :-1].bool() & (targets != 7)
    targets[~keep] = -100
    reference = F.cross_entropy(s[:, :-1].reshape(-1, 11), targets.reshape(-1), ignore_index=-100)
    assert torch.allclose(next_token_ce(s, ids, mask, ignore_id=7), reference)


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 300, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    return ids, mask


def test_teacher_captures_are_the_attention_inputs_and_outputs(hovle):
    ids, mask = batch()
    pairs, _ = TeacherForward(hovle)(ids, mask, None, [1, 3], False)
    hidden = hovle(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for (u, y), i in zip(pairs, [1, 3], strict=True):
        layer = hovle.layers[i]
        assert torch.equal(u, layer.input_norm(hidden[i]))
        # The residual stream after layer i = before + attention output + MLP.
        after_attn = hidden[i] + y
        torch.testing.assert_close(
            after_attn + layer.mlp(layer.post_norm(after_attn)), hidden[i + 1]
        )


def test_layerwise_objective_runs_only_the_mixers(hovle, monkeypatch):
    student = mmdistill.seed(hovle, attention_layers="2").float()
    ids, mask = batch(1)
    layers = student.mixer_layers()
    assert layers == [0, 1, 3]
    pairs, logits = TeacherForward(hovle)(ids, mask, None, layers, False)
    assert logits is None
    spec = LossSpec(mse_weight=1000)
    objective = DistillObjective(student, spec)

    def no_full_forward(*args, **kwargs):
        raise AssertionError("a layer-wise stage must not run the whole student")

    monkeypatch.setattr(student, "forward", no_full_forward)
    out = objective(ids, mask, None, pairs, None)
    terms = []
    for i, (u, y) in zip(layers, pairs, strict=True):
        pred = student.layers[i].mixer(u, mask=mask)
        err = ((pred - y) ** 2).mean(-1)
        terms.append(err[mask.bool()].mean())
    assert torch.allclose(out["mse"], torch.stack(terms).mean())
    assert torch.allclose(out["loss"], 1000 * out["mse"])
    out["loss"].backward()
    grads = {n for n, p in student.named_parameters() if p.grad is not None}
    assert grads and all(n.split(".")[0] == "layers" and ".mixer." in n for n in grads)
    assert not any(n.startswith("layers.2.") for n in grads)


def test_checkpointed_mixers_give_the_same_loss_and_gradients(hovle):
    ids, mask = batch(2)
    grads = []
    for flag in (False, True):
        student = mmdistill.seed(hovle).float()
        student.train()
        pairs, _ = TeacherForward(hovle)(ids, mask, None, student.mixer_layers(), False)
        out = DistillObjective(student, LossSpec(mse_weight=1), checkpoint_mixers=flag)(
            ids, mask, None, pairs, None
        )
        out["loss"].backward()
        grads.append((out["loss"].detach(), student.layers[1].mixer.z_proj.weight.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-7)


def test_end_to_end_objective_matches_kl_and_ce(hovle):
    student = mmdistill.seed(hovle, attention_layers="0").float()
    ids, mask = batch(3)
    _, teacher_logits = TeacherForward(hovle)(ids, mask, None, [], True)
    spec = LossSpec(kl_weight=2.0, kl_temperature=1.5, ce_weight=0.5)
    out = DistillObjective(student, spec)(ids, mask, None, [], teacher_logits)
    logits = student(ids, attention_mask=mask).logits
    kl = kl_per_token(logits, teacher_logits, mask, 1.5)
    ce = next_token_ce(logits, ids, mask, hovle.config.front_end["vision"]["img_context_token_id"])
    assert torch.allclose(out["kl"], kl) and torch.allclose(out["ce"], ce)
    assert torch.allclose(out["loss"], 2.0 * kl + 0.5 * ce)
    # the seeded student with every layer kept is the teacher: zero KL
    same = mmdistill.seed(hovle, attention_layers="all").float()
    zero = DistillObjective(same, LossSpec(kl_weight=1.0))(ids, mask, None, [], teacher_logits)
    assert zero["kl"].item() == pytest.approx(0.0, abs=1e-5)


def test_vision_dummy_touches_the_vision_path_without_changing_the_loss(hovle):
    student = mmdistill.seed(hovle).float()
    ids, mask = batch(4)
    _, teacher_logits = TeacherForward(hovle)(ids, mask, None, [], True)
    spec = LossSpec(kl_weight=1.0)
    plain = DistillObjective(student, spec)(ids, mask, None, [], teacher_logits)
    dummy = DistillObjective(student, spec, vision_dummy=True)(ids, mask, None, [], teacher_logits)
    assert torch.equal(plain["loss"], dummy["loss"])
    dummy["loss"].backward()
    grad = student.front.pixel_shuffle_proj[0].weight.grad
    assert grad is not None and torch.count_nonzero(grad) == 0
