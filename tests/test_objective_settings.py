"""Typed objective settings (documented, validated in one place), the config's objective section, what each
objective declares it needs, and the eager head against the fused kernel."""

import dataclasses

import pytest
import torch
import yaml

from egrpo.kernels.grpo_loss import grpo_loss
from egrpo.objectives import OBJECTIVES, build_objective
from egrpo.objectives.base import SOURCES
from egrpo.objectives.heads import eager_grpo_loss
from egrpo.trainer.config import ConfigError, config_from_dict, load_config



@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_setting_documents_meaning_and_source(name):
    for f in dataclasses.fields(OBJECTIVES[name].Settings):
        assert f.metadata.get("help"), f"{name}.{f.name} has no help text"
        assert f.metadata.get("source") in SOURCES, f"{name}.{f.name}: source {f.metadata.get('source')!r}"


@pytest.mark.parametrize("name,key,value,match", [
    ("grpo", "beta", -0.1, r"beta must be a finite number >= 0"),
    ("grpo", "normalization", "mean", r"normalization must be one of"),
    ("grpo", "chunk_size", 0, r"chunk_size must be a positive integer or null"),
    ("eg_grpo", "low_q", 1.2, r"low_q must be a number strictly inside \(0, 1\)"),
    ("eg_grpo", "kappa", 0.0, r"kappa must be a finite number > 0"),
    ("eg_grpo", "shape_text", "yes", r"shape_text must be true or false"),
    ("stage", "token_shaping", "entropy", r"token_shaping must be one of"),
    ("stage", "high_q", 0.1, r"low_q \(0.2\) must not exceed high_q \(0.1\)"),   # shared with EG-GRPO's rule
])
def test_out_of_range_values_are_one_line_errors(name, key, value, match):
    with pytest.raises(ValueError, match=match) as info:
        build_objective(name, **{key: value})
    assert "\n" not in str(info.value)


def test_stage_has_no_budget_neutral_and_grpo_no_shaping():
    with pytest.raises(ValueError, match=r"unknown hyper-parameter\(s\) \['budget_neutral'\].*valid: beta"):
        build_objective("stage", budget_neutral=True)
    with pytest.raises(ValueError, match="unknown objective 'ppo'"):
        build_objective("ppo")


def test_config_section_unknown_key_lists_valid_keys_in_one_line():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"objective": {"name": "grpo", "c1": 0.3}})
    msg = str(info.value)
    assert "\n" not in msg and "unknown key 'c1' in section 'objective'" in msg and "name, beta, eps_low" in msg
    with pytest.raises(ConfigError, match=r"objective\.kl_a must be a finite number >= 0"):
        config_from_dict({"objective": {"name": "stage", "kl_a": -1}})
    with pytest.raises(ConfigError, match=r"objective\.beta: expected a number"):
        config_from_dict({"objective": {"name": "stage", "beta": "high"}})
    with pytest.raises(ConfigError, match=r"objective\.name='ppo' is unknown \(known: eg_grpo, grpo, stage\)"):
        config_from_dict({"objective": {"name": "ppo"}})


def test_effective_settings_round_trip(tmp_path):
    cfg = config_from_dict({"objective": {"name": "stage", "beta": 0.03, "entropy_reward": False}})
    assert cfg.objective.hparams == {"beta": 0.03, "entropy_reward": False}   # what the config wrote
    written = cfg.to_dict()["objective"]
    # every setting with its effective value, defaults included
    assert written["name"] == "stage" and written["beta"] == 0.03 and written["kl_a"] == 0.5
    assert set(written) == {"name"} | {f.name for f in dataclasses.fields(OBJECTIVES["stage"].Settings)}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"objective": written}))
    again = load_config(str(path))
    assert again.objective.settings == cfg.objective.settings


def test_needs_are_declared_by_the_objective():
    assert build_objective("grpo").needs.reference_model
    assert not build_objective("grpo", beta=0.0).needs.reference_model
    stage = build_objective("stage", beta=0.0)
    assert stage.needs.reference_entropy and stage.needs.reference_model and stage.needs.codebook_vectors
    assert not build_objective("stage", beta=0.0, entropy_reward=False).needs.reference_model
    plain = build_objective("stage", reweight_advantages=False, reweight_kl=False)
    assert not plain.needs.codebook_vectors


@pytest.mark.parametrize("normalization", ["token_mean", "sequence_mean", "constant", "weighted"])
@pytest.mark.parametrize("with_old,with_weights", [(False, False), (True, True)])
def test_eager_head_matches_fused_kernel(normalization, with_old, with_weights):
    torch.manual_seed(0)
    B, T, D, V = 4, 7, 6, 23
    hidden = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(V, D, dtype=torch.float64) * 0.7).requires_grad_()
    bias = (torch.randn(V, dtype=torch.float64) * 0.3).requires_grad_()
    targets = torch.randint(0, V, (B, T))
    mask = (torch.rand(B, T) > 0.2).double()
    adv = torch.randn(B, T, dtype=torch.float64)
    kw = dict(ref_logp=-3 + torch.randn(B, T, dtype=torch.float64) * 0.3, beta=0.07, normalization=normalization,
              eps_low=0.2, eps_high=0.28, temperature=0.9)
    if with_old:
        kw["old_logp"] = -3 + torch.randn(B, T, dtype=torch.float64) * 0.3
    if with_weights:
        kw["policy_weights"] = torch.rand(B, T, dtype=torch.float64)
        kw["kl_weights"] = torch.rand(B, T, dtype=torch.float64)
    fused = grpo_loss(hidden, weight, targets, mask, adv, bias, backend="torch", **kw)
    eager = eager_grpo_loss(hidden, weight, targets, mask, adv, bias, **kw)
    torch.testing.assert_close(eager.loss, fused.loss, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(eager.loss, (hidden, weight, bias)),
                    torch.autograd.grad(fused.loss, (hidden, weight, bias))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for field in ("logp", "entropy", "kl", "clipped_low", "clipped_high", "advantages"):
        torch.testing.assert_close(getattr(eager, field), getattr(fused, field).to(getattr(eager, field).dtype),
                                   rtol=1e-10, atol=1e-12)


def test_every_setting_and_its_default_is_in_the_docs():
    import os
    import re

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "algorithms.md")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for name, cls in OBJECTIVES.items():
        for f in dataclasses.fields(cls.Settings):
            default = "null" if f.default is None else str(f.default).lower() if isinstance(f.default, bool) else f.default
            row = re.search(rf"^\| `{f.name}` \| `([^`]*)` \|", text, flags=re.M)
            assert row, f"docs/algorithms.md has no table row for {name}.{f.name}"
            if f.name != "normalization":   # STAGE's own default is stated in its table's heading line
                documented = row.group(1)
                assert documented == str(default) or float(documented) == float(default), (name, f.name, documented)


def test_a_custom_objective_that_declares_nothing_asks_for_nothing_extra():
    """`Needs()` is what a custom objective gets by default: only the policy's own log-probs (text included
    when the rollout has a CoT); no reference model, sampling log-probs, codebook vectors or guided pass."""
    import dataclasses

    from egrpo.objectives import Needs

    needs = Needs()
    assert {f.name: getattr(needs, f.name) for f in dataclasses.fields(needs)} == {
        "reference_logp": False, "reference_entropy": False, "codebook_vectors": False, "text": True,
        "sampling_logp": False, "unconditional_hidden": False}
    assert not needs.reference_model
