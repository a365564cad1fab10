"""CUDA graphs (issue 19): a patched decoder layer's forward+backward captured whole with
torch.cuda.graph and replayed, and torch.compile(mode="reduce-overhead") of a patched layer.
Both need the MM-Adapter's Triton path to be device work only: no host reads (the dropout seed
is drawn and read on the device), no CPU tensors. single_modality keeps the integrations'
default, None, which on the Triton path compares nothing (it used to read the routing tokens'
comparison on the host, which capture refuses). Eager attention:
deterministic backward, so replays can be compared bit for bit. Skipped without CUDA."""
import pytest
import torch

from mlan_kernels.integrations import patch_llama, set_backend
from mlan_kernels.integrations.tiny import tiny_model

pytestmark = pytest.mark.gpu


def _patched_layer(dropout_p, device="cuda"):
    """(layer in train mode, trainable params, hidden [2, 12, 32], (cos, sin), probe): decoder
    layer 0 of a tiny LLaMA with an adapter before attention and MLP, random adapter weights
    (LaVIN's zero up-projection would make their gradients trivial)."""
    model = patch_llama(tiny_model("llama"), rank=8, experts=2, groups=2, dropout_p=dropout_p,
                        placement="block").to(device)
    set_backend(model, "triton")                 # single_modality: the default None (no sync)
    layer = model.model.layers[0].train()
    params = [p for p in layer.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in params:
            param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    hidden = torch.randn(2, 12, 32, generator=generator).to(device)
    positions = torch.arange(12, device=device)[None].expand(2, -1)
    position_embeddings = model.model.rotary_emb(hidden, positions)
    probe = torch.randn(2, 12, 32, generator=generator).to(device)
    return layer, params, hidden, position_embeddings, probe


def _step(layer, params, hidden, position_embeddings, probe):
    """Forward and backward of <probe, layer(hidden)>; returns the layer output."""
    out = layer(hidden, position_embeddings=position_embeddings)
    out = out[0] if isinstance(out, tuple) else out
    (out * probe).sum().backward()
    return out


def _results(out, params):
    return [out.detach().clone()] + [param.grad.clone() for param in params]


@pytest.mark.parametrize("dropout_p", [0.0, 0.1], ids=["nodrop", "dropout"])
def test_decoder_layer_forward_backward_replays_from_a_cuda_graph(dropout_p):
    layer, params, *inputs = _patched_layer(dropout_p)
    side = torch.cuda.Stream()              # warm up (Triton compiles) off the default stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            for param in params:
                param.grad = None
            _step(layer, params, *inputs)
    torch.cuda.current_stream().wait_stream(side)
    for param in params:                    # the graph allocates the gradients it then rewrites
        param.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = _step(layer, params, *inputs)

    def replay(seed=None):
        if seed is not None:
            torch.cuda.manual_seed(seed)
        graph.replay()
        torch.cuda.synchronize()
        return _results(static_out, params)

    first, again = replay(seed=1), replay(seed=1)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    for param in params:                    # eager from the same generator state
        param.grad = None
    torch.cuda.manual_seed(1)
    eager = _results(_step(layer, params, *inputs), params)
    for a, b in zip(first, eager):
        torch.testing.assert_close(a, b)
    if dropout_p:                           # the seed is drawn on the device at every replay
        assert not torch.equal(replay()[0], first[0])


def test_reduce_overhead_compile_of_a_patched_layer_matches_eager():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    layer, params, *inputs = _patched_layer(dropout_p=0.0)
    compiled = torch.compile(layer, mode="reduce-overhead")

    def run(module):
        torch.compiler.cudagraph_mark_step_begin()
        for param in params:
            param.grad = None
        return _results(_step(module, params, *inputs), params)

    eager = run(layer)
    for _ in range(3):                      # warm-up, recording, then replays
        got = run(compiled)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)   # inductor fuses the base ops
    assert counters["inductor"]["cudagraph_skips"] == 0     # the graphs were captured
    torch._dynamo.reset()
