"""The engine's CUDA-graph path (`RolloutEngine._runner` / `_capture`) on CPU, with a stand-in for torch.cuda's
graph API, against the eager engine: image and CoT phases, one and several key spans, and captures at the end of a
phase (a 2-token phase; a key span that starts on the phase's last step), where the warm-up once stepped one past
the buffers (on CUDA a device-side assert that kills the process).

The stand-in behaves like a CUDA graph where it matters here: the capture records every aten op of the step with
its tensors (fixed addresses) and Python arguments (frozen), leaves memory as it found it (CUDA runs nothing while
capturing) and fails on reading a value to the host (a sync); a replay re-runs the recorded ops on the recorded
tensors, writing each result where the captured op wrote it. tests/rollout/test_engine_gpu.py runs the real thing
on a GPU."""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import egrpo.rollout.engine as engine_module
from egrpo.rollout.engine import EngineConfig, RolloutEngine, cfg_prefill, text_prefill
from egrpo.rollout.sampling import SamplingParams
from egrpo.trainer.model import ModelConfig, build_model
from egrpo.trainer.tokenizer import janus_tokens

PROMPT_LEN = 9


class _Recorder(TorchDispatchMode):
    """Records the aten ops run under it; keeps the prior value of every tensor an op writes in place."""

    def __init__(self):
        super().__init__()
        self.ops, self.written = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            raise RuntimeError("stand-in CUDA graph: host sync during capture")
        for index, argument in enumerate(func._schema.arguments):
            if argument.alias_info is not None and argument.alias_info.is_write:
                tensor = kwargs.get(argument.name, args[index] if index < len(args) else None)
                if isinstance(tensor, torch.Tensor):
                    self.written.append((tensor, tensor.clone()))
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


class _Graph:
    """``torch.cuda.CUDAGraph`` stand-in."""

    def __init__(self):
        self.ops = None

    def replay(self):
        assert self.ops is not None, "replay before capture"
        for func, args, kwargs, out in self.ops:
            result = func(*args, **kwargs)
            if any(r.alias_info is not None for r in func._schema.returns):
                continue  # in place or a view: it wrote (or aliases) the captured tensors already
            for captured, fresh in zip(tree_flatten(out)[0], tree_flatten(result)[0]):
                if isinstance(captured, torch.Tensor):
                    captured.copy_(fresh)


class _Stream:
    def wait_stream(self, other):
        pass


@pytest.fixture
def graphs(monkeypatch):
    """CUDA graphs on CPU: ``_captures_graphs`` says yes and torch.cuda's graph API is the stand-in. Returns the
    list of ``(captured step, capture_error_mode)`` of every capture."""
    captures = []

    @contextlib.contextmanager
    def graph(cuda_graph, pool=None, stream=None, capture_error_mode="global"):
        assert cuda_graph.ops is None, "captured twice"
        recorder = _Recorder()
        with recorder:
            yield
        for tensor, value in reversed(recorder.written):  # the capture ran nothing
            tensor.copy_(value)
        cuda_graph.ops = recorder.ops
        captures.append(capture_error_mode)

    monkeypatch.setattr(engine_module, "_captures_graphs", lambda device: True)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    return captures


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = build_model(
        ModelConfig(tiny=dict(image_size=32, num_layers=2, initializer_range=0.2), dtype="fp32"), "cpu")
    tokens = janus_tokens(tokenizer)
    ids = torch.randint(10, 100, (6, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, -1] = tokens.bos, tokens.image_start
    mask = torch.ones_like(ids)
    mask[:2, :3] = 0  # two left-padded rows
    return model, tokens, ids, mask


def _engines(model, key_buckets):
    """(eager, graph) engines with the CUDA settings: torch sampler on both (the stand-in cannot run Triton), no
    fused or packed weights (off on CUDA)."""
    common = dict(sampler="torch", fuse_projections=False, pack_weights=False)
    return (RolloutEngine(model, EngineConfig(cuda_graph=False, **common)),
            RolloutEngine(model, EngineConfig(cuda_graph=True, key_buckets=key_buckets, **common)))


def _spans(new_tokens, key_buckets):
    """The key span of every decode step of a phase of ``new_tokens`` tokens (what it captures one graph for)."""
    class State:
        prompt_len, total = PROMPT_LEN, PROMPT_LEN + max(new_tokens - 1, 1)
    return [RolloutEngine._key_span(State, key_buckets, step) for step in range(new_tokens - 1)]


# (new tokens, key buckets): a phase in one span; in several spans; 2 tokens (the only decode step is the last);
# 2 spans of 16 slots over a 17-slot buffer, so the second span starts on the phase's last step.
CASES = [(16, 1), (16, 3), (2, 1), (2, 2), (9, 2)]


@pytest.mark.parametrize("new_tokens,key_buckets", CASES)
def test_graph_image_phase_matches_eager(tiny, graphs, new_tokens, key_buckets):
    model, tokens, ids, mask = tiny
    eager, graph = _engines(model, key_buckets)
    prefill = cfg_prefill(model, ids, mask, tokens.pad, "left", keep_ids=(tokens.bos, tokens.image_start))
    params = SamplingParams(cfg_scale=2.0, top_k=20, top_p=0.9)
    a = eager.generate_image_tokens(prefill, new_tokens, params, seed=4)
    b = graph.generate_image_tokens(prefill, new_tokens, params, seed=4)
    assert len(graphs) == len(set(_spans(new_tokens, key_buckets))) and set(graphs) == {"thread_local"}
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logp, b.logp, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.kl, b.kl, rtol=1e-4, atol=1e-5)
    if new_tokens > 8:
        assert a.tokens.unique().numel() > 4  # the draws vary


@pytest.mark.parametrize("new_tokens,key_buckets", CASES)
def test_graph_text_phase_matches_eager(tiny, graphs, new_tokens, key_buckets):
    model, tokens, ids, mask = tiny
    eager, graph = _engines(model, key_buckets)
    prefill = text_prefill(model, ids, mask)
    params = SamplingParams(top_k=20)
    a = eager.generate_text(prefill, new_tokens, tokens.eos, tokens.pad, params, seed=9)
    b = graph.generate_text(prefill, new_tokens, tokens.eos, tokens.pad, params, seed=9)
    assert a.ids.shape[1] == new_tokens  # no early stop: every span was reached
    assert len(graphs) == len(set(_spans(new_tokens, key_buckets))) and set(graphs) == {"thread_local"}
    assert torch.equal(a.ids, b.ids) and torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.logp, b.logp, rtol=1e-4, atol=1e-5)


def test_cases_capture_on_the_last_step():
    """The end-of-phase cases above really capture a graph on the phase's last decode step."""
    for new_tokens, key_buckets in ((2, 1), (2, 2), (9, 2)):
        spans = _spans(new_tokens, key_buckets)
        assert len(spans) == 1 or spans[-1] != spans[-2], (new_tokens, key_buckets, spans)


def test_graph_of_the_compiled_step_matches_eager(tiny, graphs):
    """``compile=True`` with CUDA graphs: the compiled step (eager backend) captured once per key span, the second
    span starting on the phase's last step."""
    model, tokens, ids, mask = tiny
    torch._dynamo.reset()
    eager, _ = _engines(model, 1)
    graph = RolloutEngine(model, EngineConfig(compile=True, compile_backend="eager", prompt_bucket=0, key_buckets=2,
                                              sampler="torch", fuse_projections=False, pack_weights=False))
    prefill = cfg_prefill(model, ids, mask, tokens.pad, "left", keep_ids=(tokens.bos, tokens.image_start))
    params = SamplingParams(cfg_scale=2.0, top_k=20, top_p=0.9)
    a = eager.generate_image_tokens(prefill, 9, params, seed=4)
    b = graph.generate_image_tokens(prefill, 9, params, seed=4)
    assert len(graphs) == 2
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.kl, b.kl, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_compile_modes_with_cuda_graphs_of_their_own_are_rejected(mode):
    """Those modes make torch capture CUDA graphs inside the step, nested in the engine's capture."""
    with pytest.raises(ValueError, match="compile_mode.*cuda_graph"):
        EngineConfig(compile=True, compile_mode=mode)
    EngineConfig(compile=True, compile_mode=mode, cuda_graph=False)   # torch's graphs alone
    EngineConfig(compile=False, compile_mode=mode)                     # the mode is unused
    EngineConfig(compile=True, compile_mode="max-autotune-no-cudagraphs")


def test_graphs_default_to_four_key_spans(tiny, graphs):
    """key_buckets=None (the default): CUDA graphs without compilation attend over 4 spans (one graph each; faster
    than the whole buffer in every H200 configuration measured), the same tokens as eager."""
    model, tokens, ids, mask = tiny
    eager, _ = _engines(model, 1)
    default = RolloutEngine(model, EngineConfig(cuda_graph=True, sampler="torch", fuse_projections=False,
                                                pack_weights=False))
    assert default.config.key_buckets is None
    prefill = cfg_prefill(model, ids, mask, tokens.pad, "left", keep_ids=(tokens.bos, tokens.image_start))
    params = SamplingParams(cfg_scale=2.0)
    a = eager.generate_image_tokens(prefill, 16, params, seed=4)
    b = default.generate_image_tokens(prefill, 16, params, seed=4)
    assert len(graphs) == len(set(_spans(16, 4))) > len(set(_spans(16, 1)))
    assert torch.equal(a.tokens, b.tokens)
    with pytest.raises(ValueError, match="key_buckets"):
        EngineConfig(key_buckets=0)


def test_graphs_with_the_triton_attention_default_to_one_span(tiny, graphs, monkeypatch):
    """With the Triton decode attention (the CUDA default) the graphs attend over the whole buffer: the kernel reads
    only the filled prefix, and one graph measured as fast or faster than 4 spans on an H200."""
    model = tiny[0]
    engine = RolloutEngine(model, EngineConfig(cuda_graph=True))
    cpu = torch.device("cpu")
    assert engine._default_key_buckets(cpu) == 4          # (the stand-in graphs; torch attention on CPU)
    monkeypatch.setattr(engine, "_triton_attention", lambda device: True)
    assert engine._default_key_buckets(cpu) == 1
    assert RolloutEngine(model, EngineConfig(cuda_graph=False))._default_key_buckets(cpu) == 1
    assert RolloutEngine(model, EngineConfig(compile=True))._default_key_buckets(cpu) == 1
