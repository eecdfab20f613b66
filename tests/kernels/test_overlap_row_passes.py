"""``EGRPO_OVERLAP_ROW_PASSES=1``: the next chunk's logits GEMM is issued before this chunk's row passes (on
CUDA on a side stream). On CPU only the order changes, which is what these tests check: the results are
bit-identical to the default order, on the one-pass, batch-scope and recompute paths, and the GEMM of chunk
k + 1 really runs before the row passes of chunk k (two chunks' logits alive at once, in separate buffers)."""

import pytest
import torch

import egrpo.kernels._head as head
from egrpo.kernels import grpo_loss, linear_logprob_entropy

B, T, D, V, CHUNK = 6, 5, 16, 700, 10   # chunks of two sequences: 3 chunks, the last one full


def _case(dtype):
    torch.manual_seed(0)
    hidden = torch.randn(B, T, D).to(dtype)
    weight = (torch.randn(V, D) * 2 / D**0.5).to(dtype)
    bias = (torch.randn(V) * 0.3).to(dtype)
    targets = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.2
    return hidden, weight, bias, targets, mask


def _run(path, dtype):
    hidden, weight, bias, targets, mask = _case(dtype)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    if path == "head":   # recompute in backward, entropy with gradient too
        logp, ent = linear_logprob_entropy(leaves[0], leaves[1], targets, leaves[2], 0.8, chunk_size=CHUNK)
        (logp.double().sum() + 0.3 * ent.double().sum()).backward()
        values = (logp, ent)
    else:
        kw = dict(advantages=torch.linspace(-1, 1, B)) if path == "advantages" else dict(
            advantages=None, advantage_fn=lambda lp, e: e - e.mean())   # batch scope: a second pass
        out = grpo_loss(leaves[0], leaves[1], targets, mask, bias=leaves[2], chunk_size=CHUNK, temperature=0.8, **kw)
        out.loss.backward()
        values = (out.loss, out.logp, out.entropy)
    return values, [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["advantages", "batch_fn", "head"])
def test_lookahead_is_bit_identical(monkeypatch, path, dtype):
    monkeypatch.delenv("EGRPO_OVERLAP_ROW_PASSES", raising=False)
    plain = _run(path, dtype)
    monkeypatch.setenv("EGRPO_OVERLAP_ROW_PASSES", "1")
    ahead = _run(path, dtype)
    for a, b in zip(plain[0] + tuple(plain[1]), ahead[0] + tuple(ahead[1])):
        assert torch.equal(a, b)


def test_next_gemm_runs_before_this_chunks_row_passes(monkeypatch):
    monkeypatch.setenv("EGRPO_OVERLAP_ROW_PASSES", "1")
    calls, seen = [], []
    logits = head._ChunkBuffers.logits

    def counting_logits(self, x, w):
        z, half = logits(self, x, w)
        calls.append(z)
        return z, half

    stats = head.ROW_PASSES["torch"].stats

    def spying_stats(z, *args):
        seen.append((len(calls), any(other.data_ptr() == z.data_ptr() for other in calls if other is not z)))
        return stats(z, *args)

    monkeypatch.setattr(head._ChunkBuffers, "logits", counting_logits)
    monkeypatch.setitem(head.ROW_PASSES, "torch", head.ROW_PASSES["torch"]._replace(stats=spying_stats))
    hidden, weight, bias, targets, _ = _case(torch.float32)
    linear_logprob_entropy(hidden, weight, targets, bias, chunk_size=CHUNK)
    n_chunks = B * T // CHUNK
    # at chunk k's statistics, k + 2 GEMMs have run (the last chunk has none ahead), each into its own buffer
    assert [n for n, _ in seen] == [min(k + 2, n_chunks) for k in range(n_chunks)]
    assert not any(shared for _, shared in seen)


@pytest.mark.gpu
@pytest.mark.parametrize("frozen", [True, False])
def test_gpu_side_stream_is_bit_identical(monkeypatch, frozen):
    """On CUDA the next GEMM runs on a side stream: same results as one stream, bit for bit, over many chunks.
    (cuBLAS promises bitwise-equal results only with one active stream per workspace: if this fails, rerun with
    CUBLAS_WORKSPACE_CONFIG=:4096:8 before reading it as a race.)"""
    torch.manual_seed(0)
    Bg, Tg, Dg, Vg = 64, 64, 256, 16384
    hidden = torch.randn(Bg, Tg, Dg, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(Vg, Dg, device="cuda") / Dg**0.5).to(torch.bfloat16)
    targets = torch.randint(0, Vg, (Bg, Tg), device="cuda")
    mask = torch.ones(Bg, Tg, dtype=torch.bool, device="cuda")
    adv = torch.linspace(-1, 1, Bg, device="cuda")

    def run():
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_(not frozen)
        out = grpo_loss(h, w, targets, mask, adv, chunk_size=512)
        out.loss.backward()
        return [out.loss, out.logp, h.grad] + ([] if frozen else [w.grad])

    monkeypatch.delenv("EGRPO_OVERLAP_ROW_PASSES", raising=False)
    plain = run()
    monkeypatch.setenv("EGRPO_OVERLAP_ROW_PASSES", "1")
    for _ in range(3):   # a race would show as a difference in some run
        for a, b in zip(plain, run()):
            assert torch.equal(a, b)
