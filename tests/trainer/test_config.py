"""Config loading, overrides and validation; the colour reward and the reward set; the published recipes."""

import glob
import json
import os

import pytest
import torch

from egrpo.trainer.config import ConfigError, load_config, load_prompts, parse_value
from egrpo.rewards.registry import REWARDS, ColourReward, build_rewards, colours_in

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "configs", "demo.yaml")


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_demo_loads_and_validates():
    cfg = load_config(DEMO).validate(world_size=1)
    assert cfg.objective.name == "eg_grpo"
    assert cfg.model.tiny is not None and cfg.model.path is None
    assert cfg.rewards[0].name == "colour"
    assert cfg.rollout.group_size >= 2


def test_overrides_are_typed_and_nested():
    cfg = load_config(DEMO, ["train.steps=20", "optim.lr=1e-5", "optim.betas=[0.9,0.95]", "rewards.0.weight=2",
                             "objective.c1=0.25", "model.tiny.num_layers=1", "deepspeed.zero_stage=2",
                             "rollout.top_k=null", "data.shuffle=false"])
    assert cfg.train.steps == 20 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.rewards[0].weight == 2.0
    assert cfg.objective.hparams["c1"] == 0.25
    assert cfg.model.tiny["num_layers"] == 1
    assert cfg.deepspeed.zero_stage == 2
    assert cfg.rollout.top_k is None
    assert cfg.data.shuffle is False
    # YAML 1.1 reads "1e-5" as a string; overrides must not.
    assert parse_value("1e-5") == 1e-5 and parse_value("3") == 3 and parse_value("true") is True


def test_int_fields_accept_integral_floats_and_reject_others(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.steps: expected an integer"):
        load_config(DEMO, ["train.steps=2.5"])
    with pytest.raises(ConfigError, match=r"optim\.lr: expected a number"):
        load_config(DEMO, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"optim\.betas: expected 2 values"):
        load_config(DEMO, ["optim.betas=[0.9]"])


def test_unknown_keys_name_key_and_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'stepz' in section 'train'"):
        load_config(DEMO, ["train.stepz=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'lrr' in section 'optim'"):
        load_config(write(tmp_path, "optim: {lrr: 0.1}\n"))
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['trian'\]"):
        load_config(write(tmp_path, "trian: {steps: 1}\n"))
    with pytest.raises(ConfigError, match=r"unknown section 'trian'"):
        load_config(DEMO, ["trian.steps=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(DEMO, ["train.steps"])
    with pytest.raises(ConfigError, match="index 3 out of range"):
        load_config(DEMO, ["rewards.3.weight=1"])


def test_validation_errors_are_clear():
    with pytest.raises(ConfigError, match=r"rollout\.group_size must be >= 2"):
        load_config(DEMO, ["rollout.group_size=1"]).validate()
    with pytest.raises(ConfigError, match=r"prompts_per_step=3 is not divisible by the number of processes \(2\)"):
        load_config(DEMO, ["data.prompts_per_step=3"]).validate(world_size=2)
    with pytest.raises(ConfigError, match=r"not divisible by optim\.grad_accum=2"):
        load_config(DEMO, ["data.prompts_per_step=2", "optim.grad_accum=2"]).validate(world_size=2)
    with pytest.raises(ConfigError, match=r"model\.path is required"):
        load_config(DEMO, ["model.tiny=null"]).validate()
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.name='nope' is not a registered reward"):
        load_config(DEMO, ["rewards.0.name=nope"]).validate()
    with pytest.raises(ConfigError, match=r"objective\.name='ppo' is unknown"):
        load_config(DEMO, ["objective.name=ppo"]).validate()
    with pytest.raises(ConfigError, match=r"deepspeed\.bf16 is false but model\.dtype is 'bf16'"):
        load_config(DEMO, ["model.dtype=bf16", "deepspeed.bf16=false"]).validate()
    with pytest.raises(ConfigError, match=r"optim\.schedule"):
        load_config(DEMO, ["optim.schedule=step"]).validate()
    with pytest.raises(ConfigError, match=r"data\.prompts_file .* does not exist"):
        load_config(DEMO, ["data.prompts=null", "data.prompts_file=/nonexistent.txt"]).validate()


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red cube\n\na blue ball\n")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"prompt": "two cats", "nouns": ["cat"]}) + "\n" + json.dumps({"prompt": "a dog"}) + "\n")
    cfg = load_config(DEMO, ["data.prompts=null", f"data.prompts_file={txt}"]).validate()
    assert load_prompts(cfg.data) == (["a red cube", "a blue ball"], [{}, {}])
    cfg = load_config(DEMO, ["data.prompts=null", f"data.prompts_file={jsonl}"]).validate()
    assert load_prompts(cfg.data) == (["two cats", "a dog"], [{"nouns": ["cat"]}, {}])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"text": "x"}]))
    cfg = load_config(DEMO, ["data.prompts=null", f"data.prompts_file={bad}"])
    with pytest.raises(ConfigError, match=r"\[0\]: expected a string or a mapping with a 'prompt'"):
        load_prompts(cfg.data)


# The published recipes (docs/algorithms.md: GRPO, EG-GRPO, STAGE). Their reward names refer to adapters a later module
# registers, so only the hyper-parameters are checked here, not the reward registry.
RECIPES = {
    # the released run scripts' reward functions (EG-GRPO and its GRPO baseline: hps git gdino orm, the strict
    # GroundingDINO reward for EG-GRPO only)
    "eg_grpo_janus_pro_7b.yaml": dict(objective="eg_grpo", beta=0.01, lr=1e-6, grad_accum=2,
                                      rewards=["hps", "git_vqa", "grounding_dino+strict", "orm"]),
    "grpo_baseline.yaml": dict(objective="grpo", beta=0.01, lr=1e-6, grad_accum=2,
                               rewards=["hps", "git_vqa", "grounding_dino", "orm"]),
    "stage_geneval.yaml": dict(objective="stage", beta=0.03, lr=5e-6, grad_accum=1, entropy_reward=True,
                               rewards=["geneval"]),
    "stage_hps.yaml": dict(objective="stage", beta=0.01, lr=1e-6, grad_accum=2, entropy_reward=False,
                           rewards=["hps", "git_vqa", "grounding_dino"]),
    "stage_ocr.yaml": dict(objective="stage", beta=0.01, lr=1e-6, entropy_reward=False, rewards=["ocr"]),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_published_recipes(name):
    want = RECIPES[name]
    cfg = load_config(os.path.join(ROOT, "configs", name))
    assert cfg.objective.name == want["objective"]
    assert cfg.objective.hparams["beta"] == want["beta"]
    assert cfg.optim.lr == want["lr"]
    if "grad_accum" in want:
        assert cfg.optim.grad_accum == want["grad_accum"]
    if "entropy_reward" in want:
        assert cfg.objective.hparams["entropy_reward"] is want["entropy_reward"]
    assert [r.name + ("+strict" if r.kwargs.get("strict") else "") for r in cfg.rewards] == want["rewards"]
    assert all(r.weight == 1.0 for r in cfg.rewards)   # summed with equal weights
    assert cfg.rollout.group_size == 8 and cfg.rollout.cfg_scale == 5.0 and cfg.rollout.temperature == 1.0
    assert cfg.rollout.image_tokens == 576 and cfg.train.steps == 1600
    assert cfg.model.path and cfg.model.tiny is None
    from egrpo.objectives import build_objective

    build_objective(cfg.objective.name, **cfg.objective.hparams)   # every hyper-parameter is known


def test_all_configs_are_covered():
    names = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml"))}
    assert names == set(RECIPES) | {"demo.yaml"}


# ---------------------------------------------------------------------------------------------- rewards


def solid(rgb, h=4, w=4):
    return torch.tensor(rgb, dtype=torch.float32)[:, None, None].expand(3, h, w)


def test_colour_reward_values():
    red, blue, grey = solid((1, 0, 0)), solid((0, 0, 1)), solid((0.5, 0.5, 0.5))
    half = red.clone()
    half[:, :, 2:] = blue[:, :, 2:]
    images = torch.stack([red, blue, half, grey, red])
    prompts = ["a red apple", "a red apple", "a RED car.", "a red car", "a dog"]
    hard = ColourReward(tolerance=0.5, soft=False)(images, prompts, [{}] * 5)
    torch.testing.assert_close(hard, torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0]))
    soft = ColourReward(tolerance=1.0)(images, prompts, [{}] * 5)
    d_grey = (0.25 + 0.25 + 0.25) ** 0.5
    torch.testing.assert_close(soft, torch.tensor([1.0, 0.0, 0.5, 1 - d_grey, 0.0]))
    # Several colours: the nearest counts; metadata overrides the prompt.
    two = ColourReward(tolerance=0.5, soft=False)(images[:3], ["red or blue"] * 3, [{}] * 3)
    torch.testing.assert_close(two, torch.ones(3))
    meta = ColourReward(tolerance=0.5, soft=False)(images[:2], ["a red apple"] * 2, [{"colours": ["blue"]}] * 2)
    torch.testing.assert_close(meta, torch.tensor([0.0, 1.0]))
    assert colours_in("Red, GREEN and red") == ["red", "green"]


def test_reward_set_and_errors():
    assert "colour" in REWARDS
    images = torch.stack([solid((1, 0, 0)), solid((0, 0, 1))])
    rs = build_rewards([{"name": "colour", "weight": 2.0, "tolerance": 0.5, "soft": False},
                        {"name": "egrpo.rewards.registry:ColourReward", "weight": 0.5, "palette": {"red": (0, 0, 1)}}])
    per = rs(images, ["red", "red"], [{}, {}])
    torch.testing.assert_close(per, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(rs.combine(per), torch.tensor([2.0, 0.5]))
    assert rs.names == ["colour", "ColourReward"]
    with pytest.raises(ValueError, match=r"images must be a \[B, 3, H, W\]"):
        rs(images[:, :2], ["red", "red"], [{}, {}])
    with pytest.raises(ValueError, match="one entry per image"):
        rs(images, ["red"], [{}, {}])
    with pytest.raises(ValueError, match="unknown reward 'no_such_reward'"):
        build_rewards([{"name": "no_such_reward"}])
    with pytest.raises(ValueError, match=r"rewards\[0\] \('colour'\): bad arguments"):
        build_rewards([{"name": "colour", "sharpness": 2}])
    with pytest.raises(ValueError, match="tolerance must be > 0"):
        ColourReward(tolerance=0)


def test_model_path_checks_local_paths_and_lets_hub_ids_through(tmp_path):
    from egrpo.trainer.config import looks_like_hub_id

    assert looks_like_hub_id("deepseek-ai/Janus-Pro-7B")
    for local in ("/models/janus", "./janus", "~/janus", "runs/a/b", "janus/"):
        assert not looks_like_hub_id(local), local
    with pytest.raises(ConfigError, match=r"model\.path '/no/such/janus' does not exist"):
        load_config(DEMO, ["model.tiny=null", "model.path=/no/such/janus"]).validate()
    (tmp_path / "janus").mkdir()
    load_config(DEMO, ["model.tiny=null", f"model.path={tmp_path / 'janus'}"]).validate()
    load_config(DEMO, ["model.tiny=null", "model.path=deepseek-ai/Janus-Pro-7B"]).validate()


def test_reward_name_override_drops_the_old_arguments():
    cfg = load_config(DEMO, ["rewards.0.scale=2", "rewards.0.name=jpeg_compressibility", "rewards.0.retries=1"])
    assert cfg.rewards[0].name == "jpeg_compressibility"
    assert cfg.rewards[0].kwargs == {"scale": 2} and cfg.rewards[0].retries == 1   # no `tolerance` left
    same = load_config(DEMO, ["rewards.0.name=colour"])
    assert same.rewards[0].kwargs == {"tolerance": 1.0}   # the same name keeps its arguments


@pytest.mark.parametrize("override, needle", [
    ("train.keep_last=-1", "train.keep_last"), ("train.save_every=-1", "train.save_every"),
    ("train.log_every=0", "train.log_every"), ("train.sample_every=-1", "train.sample_every"),
    ("train.steps=0", "train.steps"), ("train.updates_per_rollout=0", "train.updates_per_rollout"),
    ("train.device=tpu", "train.device"), ("train.head_impl=fast", "train.head_impl"),
    ("train.export_format=gguf", "train.export_format"), ("model.dtype=fp16", "model.dtype"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"), ("deepspeed.bf16=true", "deepspeed.bf16"),
    ("optim.lr=0", "optim.lr"), ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("optim.grad_clip=-1", "optim.grad_clip"), ("optim.grad_accum=0", "optim.grad_accum"),
    ("data.prompts_per_step=0", "data.prompts_per_step"), ("data.schema=csv", "data.schema"),
    ("rewards.0.retries=-1", "rewards[0].retries"), ("rewards.0.on_error=retry", "rewards[0].on_error"),
    ("train.seed=-1", "train.seed"), ("model.seed=-2", "model.seed"),
    ("model.seed=18446744073709551616", "model.seed"), ("train.seed=9223372036854775808", "train.seed"),   # >= 2**63
])
def test_each_bad_setting_is_refused_naming_it(override, needle):
    """docs/training.md: a bad setting stops the run before anything starts, with one line naming the setting."""
    load_config(DEMO).validate()
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, [override]).validate()
    message = str(info.value)
    assert needle in message and "\n" not in message, message


@pytest.mark.parametrize("overrides, needle", [
    (["model.attn_implementation=flash"], "model.attn_implementation"),
    (["model.liger=true"], "model.liger"),                       # the demo trains on train.device=cpu
    (["eval.evaluator=compbench", "eval.category=spatial"], "eval.category 'spatial' is not available"),
    (["eval.evaluator=compbench", "eval.category=colour"], "eval.category must be one of"),
    (["eval.evaluator=prefs", "eval.prefs_metrics=[hps, hpsv3]"], "['hpsv3']"),
    (["eval.device=tpu"], "eval.device"),
    (["eval.device=cuda:1x"], "eval.device"),
])
def test_settings_checked_only_when_used_are_refused_up_front(overrides, needle):
    """Settings that used to be checked only where they are used (building the model, the evaluator) are refused
    by validate, so --dry-run catches them before anything loads."""
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, overrides).validate()
    message = str(info.value)
    assert needle in message and "\n" not in message, message
    assert load_config(DEMO, ["eval.evaluator=compbench", "eval.category=non_spatial", "eval.device=cuda:1",
                              "eval.evaluator=prefs", "eval.prefs_metrics=[hps, aesthetic]"]).validate()


@pytest.mark.parametrize("overrides, needed", [
    (["eval.evaluator=geneval"], "detector, clip"),
    (["eval.evaluator=compbench", "eval.category=texture"], "blip"),
    (["eval.evaluator=compbench", "eval.category=non_spatial"], "clip"),
    (["eval.evaluator=prefs", "eval.prefs_metrics=[hps, aesthetic, clipscore]"], "hps, hps_tokenizer, clip, aesthetic_head"),
])
def test_evaluation_during_training_names_the_weights_it_lacks(tmp_path, overrides, needed):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\n")
    on = ["eval.every_steps=2", f"eval.prompts={prompts}", *overrides]
    with pytest.raises(ConfigError, match=f"needs local weight paths for {needed};"):
        load_config(DEMO, on).validate()
    given = {name: str(tmp_path) for name in needed.split(", ")}
    assert load_config(DEMO, on + [f"eval.models={given}"]).validate()   # all given: no complaint
    first = needed.split(", ")[0]
    with pytest.raises(ConfigError, match=f"needs local weight paths for {first};"):   # an empty path is none
        load_config(DEMO, on + [f"eval.models={given}", f"eval.models.{first}=''"]).validate()
    load_config(DEMO, overrides).validate()                              # evaluation off: nothing needed


def test_every_attention_implementation_is_accepted():
    for name in ("sdpa", "eager", "flash_attention_2"):
        assert load_config(DEMO, [f"model.attn_implementation={name}"]).validate().model.attn_implementation == name


def test_liger_needs_cuda_and_the_package_also_with_device_auto(monkeypatch):
    """model.liger=true: refused up front on a machine without CUDA (train.device=auto picks the CPU there) and
    where liger-kernel is not installed, not found only once the model is built."""
    import importlib.util

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="model.liger=true needs a CUDA device"):
        load_config(DEMO, ["train.device=auto", "model.liger=true"]).validate()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name, *a))
    with pytest.raises(ConfigError, match="liger-kernel is not installed"):
        load_config(DEMO, ["train.device=auto", "model.liger=true"]).validate()


@pytest.mark.parametrize("key, bad, minimum", [("steps", 0, 1), ("updates_per_rollout", 0, 1), ("save_every", -1, 0),
                                               ("sample_every", -1, 0), ("keep_last", -1, 0), ("log_every", 0, 1)])
def test_train_counts_name_only_the_bad_key(key, bad, minimum):
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, [f"train.{key}={bad}"]).validate()
    assert str(info.value) == f"train.{key} must be >= {minimum}, got {bad}"
