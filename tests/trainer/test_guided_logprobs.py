"""Guided (CFG-consistent) image log-probs: ``objective.logprob_source: guided``.

The expected values are written here from the definition (docs/algorithms.md, "Guided log-probs"): the sampler's
unconditional context (BOS and image start kept, pads in between, mask all ones for the released positions),
teacher-forced through the model's own modules up to full ``[B, T, V]`` logits, ``u + w (c - u)``, log-softmax,
in float64. They share no code with ``unconditional_image_hidden`` / ``HeadBatch.policy_hidden``.
"""

import copy

import pytest
import torch

import egrpo.trainer.rollout as rollout_module
from egrpo.kernels import linear_logprob_entropy
from egrpo.objectives import build_objective
from egrpo.trainer.model import ModelConfig, build_model
from egrpo.trainer.rollout import RolloutConfig, head_inputs, rollout, unconditional_image_hidden
from egrpo.trainer.tokenizer import janus_tokens
from egrpo.trainer.train import MicroBatch, micro_loss

TINY = dict(image_size=32, patch_size=8, vq_channel_multiplier=(1, 1, 2, 2), initializer_range=0.2)  # 16 tokens
PROMPTS = ["a red square", "blue"]      # different lengths: the conditional rows have pads
W = 3.0


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = build_model(ModelConfig(tiny=TINY, dtype="fp32"), "cpu")
    recorded = []
    real = rollout_module.cfg_logits

    def record(cond, uncond, *a, **k):
        recorded.append((cond.detach().clone(), uncond.detach().clone()))
        return real(cond, uncond, *a, **k)

    rollout_module.cfg_logits = record
    try:
        # the reference sampling loop (rollout.engine=false) goes through cfg_logits, so its logits can be recorded;
        # the engine's prefills equal that loop's (tests/trainer/test_rollout.py)
        ro = rollout(model, tokenizer, PROMPTS, RolloutConfig(group_size=2, image_tokens=16, cfg_scale=W, engine=False),
                     torch.Generator().manual_seed(0))
    finally:
        rollout_module.cfg_logits = real
    return model, tokenizer, ro, recorded


def _eager_guided(model, ro, tokens, w):
    """Full float64 guided logits -> (logp, entropy) [B, T], from contexts built here by hand."""
    seq, img = ro.sequence_ids, ro.image_tokens
    B, L = seq.shape
    uncond_ids = torch.full_like(seq, tokens.pad)
    uncond_ids[:, 0], uncond_ids[:, -1] = seq[:, 0], seq[:, -1]

    def branch(ids, prompt_mask):
        embeds = torch.cat([model.get_input_embeddings()(ids),
                            model.prepare_embeddings_for_image_generation(img[:, :-1])], 1)
        mask = torch.cat([prompt_mask, torch.ones(B, img.shape[1] - 1, dtype=prompt_mask.dtype)], 1)
        pos = torch.arange(mask.shape[1]).expand(B, -1)       # "released" positions: pads count
        hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
        return model.model.generation_head(hidden[:, L - 1:]).double()   # full [B, T, V] logits

    c = branch(seq, ro.attention_mask)
    u = branch(uncond_ids, torch.ones_like(ro.attention_mask))
    log_p = torch.log_softmax(u + w * (c - u), -1)
    return log_p.gather(-1, img[..., None])[..., 0], -(log_p.exp() * log_p).sum(-1)


def test_unconditional_rows_match_the_sampler(tiny):
    """vision_head of our teacher-forced hidden states gives the logits the KV-cached sampler used, per step."""
    model, tokenizer, ro, recorded = tiny
    assert len(recorded) == ro.image_tokens.shape[1]
    with torch.no_grad():
        image, _ = head_inputs(model, ro)
        uncond = unconditional_image_hidden(model, ro, janus_tokens(tokenizer))
        vh = model.model.generation_head.vision_head
        for t, (c, u) in enumerate(recorded):
            assert (vh(image.hidden[:, t]) - c).abs().max() < 1e-4, t
            assert (vh(uncond[:, t]) - u).abs().max() < 1e-4, t


def test_guided_logp_entropy_and_gradients_match_full_logits_float64(tiny):
    model, tokenizer, ro, _ = tiny
    model64 = copy.deepcopy(model).double()
    for p in model64.parameters():
        p.requires_grad_(True)
    tokens = janus_tokens(tokenizer)
    g = torch.Generator().manual_seed(1)
    c_logp = torch.randn(ro.image_tokens.shape, generator=g, dtype=torch.float64)
    c_ent = torch.randn(ro.image_tokens.shape, generator=g, dtype=torch.float64)
    watched = [model64.model.language_model.layers[0].self_attn.q_proj.weight,
               model64.model.generation_head.proj_out.weight, model64.model.generation_head.vision_head.weight,
               model64.model.generation_head.vision_head.bias]

    logp_true, ent_true = _eager_guided(model64, ro, tokens, W)
    g_true = torch.autograd.grad((logp_true * c_logp).sum() + (ent_true * c_ent).sum(), watched)

    image, _ = head_inputs(model64, ro)
    image.uncond_hidden = unconditional_image_hidden(model64, ro, tokens)
    image.guidance_scale = W
    logp, ent = linear_logprob_entropy(image.policy_hidden(), image.weight, image.targets, image.bias,
                                       backend="torch", chunk_size=5)
    g_ours = torch.autograd.grad((logp * c_logp).sum() + (ent * c_ent).sum(), watched)
    assert (logp - logp_true).abs().max() < 1e-10 and (ent - ent_true).abs().max() < 1e-10
    for a, b in zip(g_ours, g_true):
        assert (a - b).abs().max() <= 1e-9 * (1 + b.abs().max()), (a - b).abs().max()
    # both branches carry gradient: the unconditional one alone moves the LM weights
    only_u = torch.autograd.grad((linear_logprob_entropy(
        unconditional_image_hidden(model64, ro, tokens), image.weight, image.targets, image.bias,
        backend="torch")[0]).sum(), watched[0])[0]
    assert only_u.abs().sum() > 0
    # and guided differs from conditional (w = 3 is far from 1)
    cond_logp, _ = linear_logprob_entropy(image.hidden.detach(), image.weight.detach(), image.targets,
                                          image.bias.detach(), backend="torch")
    assert (cond_logp - logp.detach()).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["grpo", "eg_grpo", "stage"])
def test_objective_guided_needs_and_fused_equals_eager(tiny, name):
    model, tokenizer, ro, _ = tiny
    extra = dict(entropy_reward=False, reweight_advantages=False, reweight_kl=False) if name == "stage" else {}
    objective = build_objective(name, logprob_source="guided", beta=0.0, backend="torch", **extra)
    assert objective.needs.unconditional_hidden
    assert not build_objective(name, beta=0.0, **extra).needs.unconditional_hidden
    rewards = torch.tensor([[1.0], [0.0], [0.3], [0.9]])
    guidance = (janus_tokens(tokenizer), W)
    results = {}
    for head in ("fused", "eager"):
        model.zero_grad(set_to_none=True)
        loss, _ = micro_loss(model, objective, MicroBatch(rollout=ro, metadata=[{}] * 4, rewards=rewards,
                                                          guidance=guidance), 2, torch.ones(1), head)
        loss.backward()
        q = model.model.language_model.layers[0].self_attn.q_proj.weight.grad
        results[head] = (loss.item(), q.clone())
    assert abs(results["fused"][0] - results["eager"][0]) < 1e-5
    assert (results["fused"][1] - results["eager"][1]).abs().max() <= 1e-4 * results["eager"][1].abs().max()
    model.zero_grad(set_to_none=True)
    # without the unconditional branch the objective refuses, naming what is missing
    with pytest.raises(ValueError, match="uncond_hidden"):
        micro_loss(model, objective, MicroBatch(rollout=ro, metadata=[{}] * 4, rewards=rewards), 2, torch.ones(1))


def test_old_logp_from_the_guided_pass_gives_ratio_one(tiny):
    """The trainer's no-grad pass with guidance gives the guided policy's own log-probs: on the same weights the
    ratio is 1 (nothing clipped with a tiny clip range), while conditional old log-probs would not be."""
    from egrpo.trainer.train import head_logp_entropy

    model, tokenizer, ro, _ = tiny
    guidance = (janus_tokens(tokenizer), W)
    objective = build_objective("grpo", logprob_source="guided", beta=0.0, eps_low=1e-4, eps_high=1e-4,
                                backend="torch")
    rewards = torch.tensor([[1.0], [0.0], [0.3], [0.9]])
    clipped = {}
    for label, g in (("guided", guidance), ("conditional", None)):
        mb = MicroBatch(rollout=ro, metadata=[{}] * 4, rewards=rewards, guidance=guidance)
        mb.old = {k: v[0] for k, v in head_logp_entropy(model, ro, "torch", None, g).items()}
        with torch.no_grad():
            _, metrics = micro_loss(model, objective, mb, 2, torch.ones(1), "fused")
        clipped[label] = metrics["clip/frac_low"] + metrics["clip/frac_high"]
    assert clipped["guided"] == 0.0 and clipped["conditional"] > 0.1, clipped


def test_logprob_source_setting_is_checked():
    with pytest.raises(ValueError, match="logprob_source must be one of"):
        build_objective("grpo", logprob_source="cfg")


def test_training_with_guided_logprobs_in_one_config_line(tmp_path):
    """objective.logprob_source=guided trains end to end (reference model and two updates per rollout: the
    no-grad passes run the unconditional branch too) and differs from a conditional run on the same rollout."""
    from egrpo.trainer.metrics import read_metrics
    from egrpo.trainer.train import train
    from tests.trainer._helpers import small_config

    common = ["objective.name=grpo", "objective.beta=0.01", "train.steps=1", "train.updates_per_rollout=2",
              "optim.lr=0.05", "optim.grad_clip=0"]
    guided = train(small_config(tmp_path / "guided", *common, "objective.logprob_source=guided"), return_params=True)
    cond = train(small_config(tmp_path / "cond", *common), return_params=True)
    rg = read_metrics(guided["metrics"])[0]
    assert rg["loss"] == rg["loss"]          # finite, logged
    assert rg["reward/mean"] == read_metrics(cond["metrics"])[0]["reward/mean"]   # same rollout
    assert any(not torch.equal(guided["params"][n], cond["params"][n]) for n in guided["params"])
