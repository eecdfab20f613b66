"""EG-GRPO analysis figures 4 (middle, right) and 5, run comparisons, token histograms, released text entropy."""

import argparse
import json
import math

import pytest
import torch


def run_cli(argv):
    from egrpo.tools.cli import add_tool_subcommands

    parser = argparse.ArgumentParser()
    add_tool_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def record(std, mean, reward, **extra):
    return dict(prompt="p", cot_index=0, image_index=0, reward=reward, image_entropy_mean=mean,
                image_entropy_std=std, cot_entropy_mean=0.4, cot_entropy_std=0.1, **extra)


def test_std_bins_by_hand():
    from egrpo.tools.plot_analysis import std_bin_correlations

    # Bin 1 (std .01-.03): reward falls with the mean (r = -1); bin 2 (std .05-.07): rises (r = +1).
    low = [record(0.01 + 0.01 * i, m, 1.0 - m) for i, m in enumerate([0.2, 0.4, 0.6])]
    high = [record(0.05 + 0.01 * i, m, 2.0 * m) for i, m in enumerate([0.3, 0.1, 0.5])]
    rows = std_bin_correlations(high + low, bins=2)
    assert [r["n"] for r in rows] == [3, 3]
    assert rows[0]["std_low"] == pytest.approx(0.01) and rows[0]["std_high"] == pytest.approx(0.03)
    assert rows[0]["std_mean"] == pytest.approx(0.02) and rows[1]["std_mean"] == pytest.approx(0.06)
    assert rows[0]["pearson_r"] == pytest.approx(-1.0) and rows[1]["pearson_r"] == pytest.approx(1.0)
    assert math.isnan(std_bin_correlations(low[:2], bins=1)[0]["pearson_r"])  # fewer than 3 records
    with pytest.raises(ValueError, match="bins"):
        std_bin_correlations(low, bins=0)


def test_histograms_by_hand():
    from egrpo.tools.analyze import entropy_histogram
    from egrpo.tools.plot_analysis import merged_histogram

    assert entropy_histogram(torch.tensor([0.0, 0.05, 0.5, 1.0, 1.2]), 4) == [2, 0, 1, 2]
    density = merged_histogram([{"h": [1, 3]}, {"h": [0, 4]}, {}], "h")
    assert density == pytest.approx([2 * 1 / 8, 2 * 7 / 8])  # counts [1, 7] of 8, bin width 1/2
    assert merged_histogram([{}], "h") is None
    with pytest.raises(ValueError, match="bin counts"):
        merged_histogram([{"h": [1, 2]}, {"h": [1, 2, 3]}], "h")


def test_released_text_entropy_every_position():
    from egrpo.tools.analyze import released_text_entropy
    from egrpo.trainer.model import ModelConfig, build_model

    model, _ = build_model(ModelConfig(tiny={"num_layers": 1}, dtype="fp32", seed=1), "cpu")
    context = torch.tensor([[0, 1, 5, 7], [1, 9, 4, 6]])
    context_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    cot = torch.tensor([[11, 12, 2, 2], [13, 14, 15, 16]])
    cot_mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    got = released_text_entropy(model, context, context_mask, cot, cot_mask)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([context, cot], 1),
                       attention_mask=torch.cat([context_mask, cot_mask.long()], 1)).logits.double()
    logp = logits.log_softmax(-1)
    expected = -(logp.exp() * logp).sum(-1) / math.log(logits.shape[-1])
    assert got.shape == (2, 8)  # prompt, CoT and padding positions all present
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_analyze_records_histograms():
    from egrpo.tools.analyze import analyze_prompt
    from egrpo.trainer.model import ModelConfig, build_model, num_image_tokens
    from egrpo.rewards.registry import build_rewards
    from egrpo.trainer.rollout import RolloutConfig

    import egrpo.rewards  # noqa: F401

    model, tokenizer = build_model(ModelConfig(tiny={"image_size": 32, "num_layers": 1}, dtype="fp32"), "cpu")
    cfg = RolloutConfig(image_tokens=num_image_tokens(model))
    rows = analyze_prompt(model, tokenizer, "a red car", {}, build_rewards([{"name": "colour"}]), 0, 2, cfg,
                          torch.Generator().manual_seed(0), entropy_bins=10)
    assert len(rows) == 2
    for row in rows:
        assert len(row["image_entropy_hist"]) == 10 and sum(row["image_entropy_hist"]) == num_image_tokens(model)
        assert "cot_entropy_hist" not in row and row["text_entropy"] == "masked"
    with pytest.raises(ValueError, match="text_entropy"):
        analyze_prompt(model, tokenizer, "x", {}, build_rewards([{"name": "colour"}]), 0, 1, cfg,
                       torch.Generator(), text_entropy="all")


@pytest.mark.parametrize("engine", [True, False])
def test_released_text_entropy_sees_eos_after_eos(engine, monkeypatch):
    """As in the released rollout, the CoT positions after a row's EOS hold EOS again (not the pad token): the
    released analysis scores those positions, so their entropies are those of EOS inputs."""
    import egrpo.tools.analyze as analyze
    from egrpo.rewards.registry import build_rewards
    from egrpo.trainer.model import ModelConfig, build_model, num_image_tokens
    from egrpo.trainer.rollout import RolloutConfig
    from egrpo.trainer.tokenizer import janus_tokens

    import egrpo.rewards  # noqa: F401

    model, tokenizer = build_model(ModelConfig(tiny={"image_size": 32, "num_layers": 1}, dtype="fp32"), "cpu")
    tokens = janus_tokens(tokenizer)
    assert tokens.eos != tokens.pad
    seen = []
    original = analyze.released_text_entropy

    def recording(model, context_ids, context_mask, cot_ids, cot_mask):
        seen.append((cot_ids.clone(), cot_mask.clone()))
        return original(model, context_ids, context_mask, cot_ids, cot_mask)

    monkeypatch.setattr(analyze, "released_text_entropy", recording)

    def more_eos(module, inputs, output):            # CoTs stop at different lengths
        output = output.clone()
        output[..., tokens.eos] += 4.0
        return output

    handle = model.lm_head.register_forward_hook(more_eos)
    try:
        cfg = RolloutConfig(image_tokens=num_image_tokens(model), cot_max_tokens=12, engine=engine)
        rows = analyze.analyze_prompt(model, tokenizer, "a red car", {}, build_rewards([{"name": "colour"}]), 4, 1,
                                      cfg, torch.Generator().manual_seed(0), text_entropy="released")
    finally:
        handle.remove()
    (cot_ids, cot_mask), = seen
    after = cot_mask == 0
    assert len(rows) == 4 and after.any()                          # some rows ended before the longest one
    assert (cot_ids[after] == tokens.eos).all()
    lengths = cot_mask.sum(1).long()
    assert all(cot_ids[r, n - 1] == tokens.eos for r, n in enumerate(lengths.tolist()) if n < cot_ids.shape[1])


def test_single_run_and_comparison_figures(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    paths = []
    for run, shift in (("janus", 0.0), ("trained", 0.1)):
        records = []
        for i in range(40):
            std = 0.005 + 0.04 * float(torch.rand((), generator=g))
            mean = 0.4 + 0.2 * float(torch.rand((), generator=g)) - shift
            records.append(record(std, mean, 1.0 - mean + 0.01 * float(torch.randn((), generator=g)),
                                  image_entropy_hist=[int(x) for x in torch.randint(0, 9, (10,), generator=g)],
                                  cot_entropy_hist=[int(x) for x in torch.randint(0, 9, (10,), generator=g)]))
        path = tmp_path / f"{run}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        paths.append(str(path))
    assert run_cli(["plot-analysis", paths[0], "--out", str(tmp_path / "one"), "--std-bins", "4"]) == 0
    for name in ("std_bins_vs_correlation.png", "reward_vs_image_entropy_unstable.png"):
        assert (tmp_path / "one" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((tmp_path / "one" / "std_bins_vs_correlation.csv").read_text().splitlines()) == 5
    assert run_cli(["plot-analysis", *paths, "--labels", "Janus-Pro", "EG-GRPO", "--out", str(tmp_path / "cmp")]) == 0
    for name in ("compare_reward_vs_entropy.png", "token_entropy_distributions.png"):
        assert (tmp_path / "cmp" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (tmp_path / "cmp" / "compare_summary.md").read_text()
    assert "| Janus-Pro | 40 |" in summary and "| EG-GRPO | 40 |" in summary
    with pytest.raises(ValueError, match="labels"):
        run_cli(["plot-analysis", *paths, "--labels", "one", "--out", str(tmp_path / "bad")])
