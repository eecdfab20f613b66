"""The analysis, plotting, generation and scoring tools on a tiny random Janus and synthetic records."""

import argparse
import json
import math
import os

import pytest
import torch

TINY = '{"image_size": 32, "num_layers": 1}'


def run_cli(argv):
    from egrpo.tools.cli import add_tool_subcommands

    parser = argparse.ArgumentParser()
    add_tool_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_p_values_match_known_values():
    from egrpo.tools.stats import pearson, rank, spearman, t_two_sided_p

    assert t_two_sided_p(2.228, 10) == pytest.approx(0.05, abs=2e-4)       # t table: df 10, 97.5 %
    assert t_two_sided_p(0.0, 7) == pytest.approx(1.0)
    r, p = pearson([1, 2, 3, 4, 5], [2, 1, 4, 3, 5], use_scipy=False)
    assert r == pytest.approx(0.8) and p == pytest.approx(0.104088, abs=1e-5)   # scipy.stats.pearsonr
    rho, p = spearman([1, 2, 2, 3], [1, 3, 2, 4], use_scipy=False)
    assert rho == pytest.approx(0.9486833, abs=1e-6) and p == pytest.approx(0.0513167, abs=1e-6)
    assert rank(torch.tensor([3.0, 1.0, 3.0, 2.0], dtype=torch.float64)).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert pearson([1, 2, float("nan"), 4], [1, 2, 5, 4], use_scipy=False)[0] == pytest.approx(1.0)


def synthetic_records(n_prompts=3, cots=3, images=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    records = []
    for k in range(n_prompts):
        for c in range(cots):
            cot_h = 0.3 + 0.1 * c + 0.02 * k
            for m in range(images):
                std = float(torch.rand((), generator=g)) * 0.02
                mean = 0.5 + float(torch.rand((), generator=g)) * 0.2
                reward = 1.0 - mean + 0.5 * cot_h + 0.01 * float(torch.randn((), generator=g))
                records.append(dict(prompt=f"prompt {k}", prompt_index=k, cot_index=c, image_index=m, reward=reward,
                                    rewards={"r": reward}, image_entropy_mean=mean, image_entropy_std=std,
                                    cot_entropy_mean=cot_h, cot_entropy_std=0.05, entropy_logits="conditional"))
    return records


def test_plot_analysis_figures_and_table(tmp_path):
    from egrpo.tools.plot_analysis import correlation_table

    records = synthetic_records()
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert run_cli(["plot-analysis", str(path), "--out", str(tmp_path / "plots")]) == 0
    for name in ("reward_vs_image_entropy.png", "reward_vs_cot_entropy_stable.png", "reward_by_cot.png"):
        with open(tmp_path / "plots" / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    table = {(row["x"], row["subset"]): row for row in correlation_table(records, 0.011)}
    mean_row = table[("image_entropy_mean", "all")]
    assert mean_row["n"] == len(records) and mean_row["pearson_r"] < -0.5 and mean_row["pearson_p"] < 1e-3
    stable = table[("cot_entropy_mean", "image_entropy_std<0.011")]
    assert stable["n"] == sum(r["image_entropy_std"] < 0.011 for r in records) and stable["pearson_r"] > 0
    assert "| image_entropy_mean | all |" in (tmp_path / "plots" / "correlations.md").read_text()


def test_analyze_generate_score_end_to_end(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red apple", "colours": ["red"]}) + "\n"
                       + json.dumps({"prompt": 'a sign that says "HI"'}) + "\n")
    out = tmp_path / "analysis.jsonl"
    common = ["--tiny", TINY, "--dtype", "fp32", "--prompts", str(prompts), "--cot-max-tokens", "4", "--no-progress"]
    assert run_cli(["analyze", *common, "--cots", "2", "--images", "2", "--entropy-logits", "cfg",
                    "--reward", "colour", "--reward", "jpeg_compressibility=0.5", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 * 2 * 2
    assert [(r["prompt_index"], r["cot_index"], r["image_index"]) for r in records[:4]] == \
        [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]
    for r in records:
        # entropy values: test_cfg_and_cot_entropies_equal_eager_full_logits checks them against full logits
        assert r["entropy_logits"] == "cfg" and r["cot_tokens"] >= 1
        assert set(r["rewards"]) == {"colour", "jpeg_compressibility"}
        assert r["reward"] == pytest.approx(r["rewards"]["colour"] + 0.5 * r["rewards"]["jpeg_compressibility"], rel=1e-5)
    assert records[0]["cot"] == records[1]["cot"]                         # M images share their CoT
    assert records[0]["image_entropy_mean"] != records[1]["image_entropy_mean"]

    gen = tmp_path / "gen"
    at = common.index("--cot-max-tokens")
    no_cot = common[:at] + common[at + 2:]   # (CoT flags without --cot are refused)
    assert run_cli(["generate", *no_cot, "--out", str(gen), "--images-per-prompt", "2", "--seed", "3"]) == 0
    rows = [json.loads(line) for line in (gen / "generations.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == ["00000_00.png", "00000_01.png", "00001_00.png", "00001_01.png"]
    assert rows[2]["seed"] == 4 and rows[0]["metadata"] == {"colours": ["red"]} and rows[0]["cot"] is None
    assert all(os.path.exists(gen / r["file"]) for r in rows)

    capsys.readouterr()
    assert run_cli(["score", "--images", str(gen), "--reward", "colour", "--reward", "jpeg_compressibility=2",
                    "--out", str(tmp_path / "scores.jsonl")]) == 0
    table = capsys.readouterr().out
    assert "colour" in table and "jpeg_compressibility" in table and "00001_01.png" in table and "mean" in table
    scores = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    from egrpo.tools.score import load_image
    from egrpo.rewards.compressibility import JpegCompressibilityReward

    image = load_image(str(gen / "00000_00.png"))
    expected = JpegCompressibilityReward()(image[None], ["x"], None).item()
    assert scores[0]["jpeg_compressibility"] == pytest.approx(expected)
    assert scores[0]["total"] == pytest.approx(scores[0]["colour"] + 2 * expected, rel=1e-5)


def test_conditional_entropy_equals_eager_full_logits():
    from egrpo.tools.analyze import analyze_prompt
    from egrpo.trainer.model import ModelConfig, build_model
    from egrpo.rewards.registry import build_rewards
    from egrpo.trainer.rollout import RolloutConfig, rollout

    tiny = {"image_size": 32, "num_layers": 1, "initializer_range": 0.5}   # peaky logits: entropies spread out
    model, tokenizer = build_model(ModelConfig(tiny=tiny, dtype="fp32"), "cpu")
    cfg = RolloutConfig(image_tokens=16, cot_max_tokens=4)
    rows = analyze_prompt(model, tokenizer, "a red car", {}, build_rewards([{"name": "colour"}]), 0, 1, cfg,
                          torch.Generator().manual_seed(5), "conditional")
    ro = rollout(model, tokenizer, ["a red car"], cfg, torch.Generator().manual_seed(5))
    # independent: full causal-LM forward over prompt + image tokens, generation head on every image position
    with torch.no_grad():
        embeds = torch.cat([model.get_input_embeddings()(ro.sequence_ids),
                            model.prepare_embeddings_for_image_generation(ro.image_tokens[:, :-1])], 1)
        hidden = model.model.language_model(inputs_embeds=embeds).last_hidden_state
        logits = model.model.generation_head(hidden[:, ro.sequence_ids.shape[1] - 1:]).double()
    p = logits.softmax(-1)
    entropy = -(p * p.log()).sum(-1)[0] / math.log(logits.shape[-1])
    assert rows[0]["image_entropy_mean"] == pytest.approx(float(entropy.mean()), rel=1e-5)
    assert entropy.std() > 1e-3
    assert rows[0]["image_entropy_std"] == pytest.approx(float(entropy.std()), rel=1e-4)
    assert rows[0]["cot_entropy_mean"] is None


def test_cfg_and_cot_entropies_equal_eager_full_logits():
    """``--entropy-logits cfg`` and the CoT entropies against full-logit float64 forwards written here: the
    guided logits ``(u + w (c - u)) / tau`` with top-k, and the LM head at the CoT positions."""
    from dataclasses import replace

    from egrpo.tools.analyze import analyze_prompt
    from egrpo.trainer.model import ModelConfig, build_model
    from egrpo.rewards.registry import build_rewards
    from egrpo.trainer.rollout import RolloutConfig, rollout
    from egrpo.trainer.tokenizer import janus_tokens

    tiny = {"image_size": 32, "num_layers": 1, "initializer_range": 0.5}
    model, tokenizer = build_model(ModelConfig(tiny=tiny, dtype="fp32"), "cpu")
    cfg = RolloutConfig(image_tokens=16, cot_max_tokens=6, top_k=50)
    rows = analyze_prompt(model, tokenizer, "a red car", {}, build_rewards([{"name": "colour"}]), 1, 1, cfg,
                          torch.Generator().manual_seed(5), "cfg")
    ro = rollout(model, tokenizer, ["a red car"], replace(cfg, cot=True, group_size=1), torch.Generator().manual_seed(5))
    tokens = janus_tokens(tokenizer)
    # the unconditional prompt, by hand: everything but BOS and the image-start token becomes the pad token
    uncond_ids = ro.sequence_ids.clone()
    for t, tok in enumerate(ro.sequence_ids[0].tolist()):
        if tok not in (tokens.bos, tokens.image_start):
            uncond_ids[0, t] = tokens.pad

    def last_hidden(ids, dtype):
        embeds = torch.cat([model.get_input_embeddings()(ids),
                            model.prepare_embeddings_for_image_generation(ro.image_tokens[:, :-1])], 1)
        return model.model.language_model(inputs_embeds=embeds.to(dtype)).last_hidden_state

    def entropy(logits):
        p = logits.softmax(-1)
        return -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)

    def eager(dtype):
        """Image (CFG-guided, top-k) and CoT entropies from full logits, the whole model in ``dtype``."""
        model.to(dtype)
        with torch.no_grad():
            n = ro.sequence_ids.shape[1]
            cond_hidden = last_hidden(ro.sequence_ids, dtype)
            cond = model.model.generation_head(cond_hidden[:, n - 1:])[0]
            unc = model.model.generation_head(last_hidden(uncond_ids, dtype)[:, n - 1:])[0]
            guided = (unc + cfg.cfg_scale * (cond - unc)) / cfg.temperature
            kth = guided.topk(cfg.top_k, dim=-1).values[:, -1:]
            guided = torch.where(guided < kth, torch.full_like(guided, float("-inf")), guided)
            image_h = entropy(guided) / math.log(guided.shape[-1])
            # CoT entropies come from the text phase's own context (system + template + CoT), one unpadded row
            p_len, c_len = ro.text_ids.shape[1], ro.cot_ids.shape[1]
            text_embeds = model.get_input_embeddings()(torch.cat([ro.text_ids, ro.cot_ids], 1)).to(dtype)
            text_hidden = model.model.language_model(inputs_embeds=text_embeds).last_hidden_state
            cot_logits = model.lm_head(text_hidden[0, p_len - 1:p_len - 1 + c_len])
            valid = ro.cot_mask[0].bool()
            cot_h = (entropy(cot_logits) / math.log(cot_logits.shape[-1]))[valid]
        return {"image_entropy_mean": float(image_h.mean()), "image_entropy_std": float(image_h.std()),
                "cot_entropy_mean": float(cot_h.mean())}, valid, image_h

    eager32, _, _ = eager(torch.float32)
    truth, valid, image_h = eager(torch.float64)
    assert valid.sum() >= 2 and image_h.std() > 1e-3
    # never worse than eager fp32 against float64 (CFG with w = 5 amplifies fp32 rounding) plus a small margin
    for key, value in truth.items():
        assert abs(rows[0][key] - value) <= 2 * abs(eager32[key] - value) + 1e-6 * abs(value), key
    assert rows[0]["cot_tokens"] == int(valid.sum())
