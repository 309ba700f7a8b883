"""The compile path: regional compilation, no graph breaks, no recompilation across timesteps.

Graph breaks and recompilations are decided by TorchDynamo's tracing, whatever backend compiles
the traced graph, so these tests trace with ``backend="eager"`` / ``"aot_eager"`` (seconds, no C++
build). Inductor's numerics are checked against the fixtures by the parity tests with the switches
on (tests/test_dit_parity.py, tests/test_autoencoder_parity.py). Every test that traces is in the
slow tier (seconds of TorchDynamo each); the helpers' argument checks and the decoder's memory-format
switch are fast.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from dmvae._compile import compile_module, compile_repeated_blocks, is_compiled
from dmvae.autoencoder import DMVAE
from dmvae.decoders import FluxDecoder
from dmvae.dit import LatentDiT, LatentDiTBlock
from dmvae.samplers import sample


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # nn.Module.compile caches on the shared Module._call_impl code: start and end clean
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


@pytest.fixture
def dit(fixtures_dir) -> LatentDiT:
    """The fixture LightningDiT (4x4x8 latents, depth 2) with its trained, non-zero adaLN."""
    kwargs = json.loads((fixtures_dir / "dit" / "manifest.json").read_text())["constructor_kwargs"]
    return LatentDiT.from_pretrained(fixtures_dir / "dit" / "ckpt.pt", config=kwargs, use_ema=True)


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.slow
def test_dit_regional_compile_one_graph_for_all_blocks_no_break_no_recompile_over_t(dit):
    x = torch.randn(3, 8, 4, 4)
    y = torch.tensor([1, 2, 10])
    with torch.no_grad():
        expected = [dit(x, torch.full((3,), t), y) for t in (0.0, 0.3, 0.95)]
    dit.compile(backend="eager")  # fullgraph=True: a graph break in the block raises
    assert is_compiled(dit.blocks) and len(dit.blocks) == 2
    assert not is_compiled(dit.final_layer)
    with torch.no_grad():
        first = dit(x, torch.zeros(3), y)
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = [dit(x, torch.full((3,), t), y) for t in (0.0, 0.3, 0.95)]
            got.append(dit(x, 0.5, y))  # a Python scalar t is made a tensor before the blocks
    assert _graphs() == 1  # both blocks (and every t) run the same graph
    assert counters["graph_break"] == {}
    torch.testing.assert_close(first, expected[0], rtol=0, atol=0)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.slow
def test_recompile_guard_in_these_tests_can_fail(dit):
    """Negative control: with static shapes a new batch size must recompile, and the
    ``error_on_recompile`` patch used above must then raise."""
    dit.compile(backend="eager", dynamic=False)
    with torch.no_grad():
        dit(torch.randn(2, 8, 4, 4), torch.rand(2), torch.tensor([1, 2]))
        with torch._dynamo.config.patch(error_on_recompile=True), pytest.raises(Exception, match="ecompil"):
            dit(torch.randn(3, 8, 4, 4), torch.rand(3), torch.tensor([1, 2, 3]))


@pytest.mark.slow
@pytest.mark.parametrize("method,cfg", [("euler", 1.5), ("euler-maruyama", 4.0), ("heun", 1.0)])
def test_sampling_with_compiled_model_compiles_once(dit, method, cfg):
    noise = torch.randn(2, 8, 4, 4)
    labels = torch.tensor([3, 7])
    kw = dict(num_steps=5, method=method, cfg_scale=cfg, generator=torch.Generator().manual_seed(0))
    eager = sample(dit, noise, labels, **kw)
    dit.compile(backend="eager")
    kw["generator"] = torch.Generator().manual_seed(0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = sample(dit, noise, labels, **kw)
    assert _graphs() == 1
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@pytest.mark.slow
def test_whole_model_compile_traces_without_breaks(dit):
    x, t, y = torch.randn(2, 8, 4, 4), torch.tensor([0.2, 0.7]), torch.tensor([4, 10])
    with torch.no_grad():
        expected = dit(x, t, y)
        dit.compile(regional=False, backend="eager")
        got = dit(x, t, y)
        with torch._dynamo.config.patch(error_on_recompile=True):
            dit(x, torch.tensor([0.9, 0.1]), y)
    assert _graphs() == 1 and counters["graph_break"] == {}
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.slow
def test_compiled_training_step_matches_eager(dit):
    """AOT autograd traces forward and backward of the block; gradients equal the eager ones."""
    ref = copy.deepcopy(dit).train()
    model = dit.train().compile(backend="aot_eager")
    x, t, y = torch.randn(4, 8, 4, 4), torch.rand(4), torch.tensor([0, 1, 2, 3])
    drop = torch.tensor([False, True, False, False])
    losses = []
    for m in (ref, model):
        loss = m(x, t, y, force_drop_ids=drop).square().mean()
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-6)
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert counters["graph_break"] == {}


@pytest.mark.slow
def test_compiled_gradient_checkpointing(dit):
    model = dit.train().enable_gradient_checkpointing().compile(backend="aot_eager")
    out = model(torch.randn(2, 8, 4, 4), torch.rand(2), torch.tensor([1, 2]))
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.blocks.parameters() if p.requires_grad)


@pytest.mark.slow
def test_dmvae_compile_encoder_blocks_and_decoder_fullgraph():
    vae = DMVAE("dmvae-tiny").eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z_ref = vae.encode(x)
        rec_ref = vae.decode(z_ref)
    vae.compile(backend="eager")  # fullgraph=True everywhere
    assert vae.decoder.memory_format == torch.channels_last
    assert vae.decoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    assert is_compiled(vae.encoder.model.blocks) and is_compiled(vae.decoder)
    assert not is_compiled(vae.bottle_neck)
    with torch.no_grad():
        z = vae.encode(x)
        rec = vae.decode(z)
    assert _graphs() == 2  # one ViT-block graph shared by both blocks + the decoder
    assert counters["graph_break"] == {}
    torch.testing.assert_close(z, z_ref, rtol=0, atol=0)
    assert rec.is_contiguous() and rec.shape == rec_ref.shape
    torch.testing.assert_close(rec, rec_ref, rtol=0, atol=1e-4)  # NHWC summation order


@pytest.mark.slow
def test_dmvae_slicing_with_compiled_decoder_matches_whole_batch():
    vae = DMVAE("dmvae-tiny").eval().compile(backend="eager", encoder=False, channels_last=False)
    z = torch.randn(3, 8, 2, 2)
    with torch.no_grad():
        whole = vae.decode(z)
        sliced = vae.decode(z, chunk_size=2)  # chunks of 2 and 1: batch 1 marks the batch dynamic
        with torch._dynamo.config.patch(error_on_recompile=True):
            vae.decode(torch.randn(5, 8, 2, 2), chunk_size=5)
    # batch-size dependent conv kernels: ~4e-6 apart in eager mode too
    torch.testing.assert_close(sliced, whole, rtol=0, atol=2e-5)


def test_decoder_memory_format_switch():
    dec = FluxDecoder(4, 32, (1, 1), 1).eval()
    z = torch.randn(2, 4, 3, 5)
    with torch.no_grad():
        nchw = dec(z)
        dec.set_memory_format(torch.channels_last)
        assert dec.conv_in[1].weight.is_contiguous(memory_format=torch.channels_last)
        nhwc = dec(z)
    assert nhwc.is_contiguous() and nhwc.shape == (2, 3, 12, 20)
    torch.testing.assert_close(nhwc, nchw, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="channels_last"):
        dec.set_memory_format(torch.preserve_format)


def test_compile_helpers_errors():
    dec = FluxDecoder(4, 32, (1, 1), 1)
    with pytest.raises(ValueError, match="no submodule of type LatentDiTBlock"):
        compile_repeated_blocks(dec, LatentDiTBlock)
    with pytest.raises(ValueError, match="freezing"):
        compile_repeated_blocks(dec, FluxDecoder, options={"freezing": True})
    with pytest.raises(ValueError, match="either mode= or options="):
        compile_module(dec, mode="max-autotune", options={"freezing": True})
    assert not is_compiled(dec)
