import pytest
import torch
from conftest import tiny_model

from dmoe.errors import ExpertFormatError, UnsupportedModelError
from dmoe.experts.format import load_expert, read_expert_metadata, save_expert
from dmoe.experts.lora import (
    ExpertAdapter,
    ExpertMLP,
    LoraSpec,
    check_supported,
    merged_mlp_forward,
    random_expert,
)


def _experts(adapter, n, spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [random_expert(f"e{i}", adapter.mlp_shapes, spec, g, std=0.2) for i in range(n)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("k", [1, 3])
def test_stacked_lora_matches_merged_reference(arch, k):
    model = tiny_model(arch)
    spec = LoraSpec(rank=4, alpha=16)
    adapter = ExpertAdapter(model, spec)
    experts = _experts(adapter, k, spec)
    layer = adapter.layer_ids[-1]
    mlp = adapter.mlps[layer]
    x = torch.randn(2, 5, 64)
    adapter.activate(experts)
    fast = mlp(x)
    ref = merged_mlp_forward(mlp.base, x, experts, layer)
    base = mlp.base(x)
    assert (fast - base).abs().max() > 1e-3, "experts must change the output"
    # fp32 fast path vs an fp64 merged reference: fp32 rounding only.
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)


def test_cat_equals_sum_of_single_experts():
    model = tiny_model()
    spec = LoraSpec()
    adapter = ExpertAdapter(model, spec)
    experts = _experts(adapter, 3, spec)
    mlp = adapter.mlps[adapter.layer_ids[-1]]
    x = torch.randn(1, 3, 64)
    adapter.activate(experts)
    y_all = mlp._proj("up_proj", x)
    base = mlp.base.up_proj(x)
    deltas = []
    for e in experts:
        adapter.activate([e])
        deltas.append(mlp._proj("up_proj", x) - base)
    torch.testing.assert_close(y_all, base + sum(deltas), atol=1e-5, rtol=1e-5)


def test_per_row_sets_match_each_set_activated_alone():
    """activate_rows (host-built stacks, one copy per projection) against activate per row:
    rows with 2, 0 and 1 experts, and weights, give each row exactly its own set's MLP."""
    model = tiny_model()
    spec = LoraSpec()
    adapter = ExpertAdapter(model, spec)
    e = _experts(adapter, 3, spec)
    sets = [([e[0], e[1]], [0.5, 2.0]), ([], []), ([e[2]], [1.0])]
    mlp = adapter.mlps[adapter.layer_ids[-1]]
    x = torch.randn(3, 4, 64)
    adapter.activate_rows(sets)
    rows = mlp(x)
    assert adapter.active == ()
    for row, (experts, weights) in enumerate(sets):
        adapter.activate(experts, weights)
        torch.testing.assert_close(rows[row], mlp(x[row:row + 1])[0], atol=1e-6, rtol=1e-6)
    assert not torch.equal(rows[0], rows[2])


def test_empty_set_is_exact_base_and_detach_restores():
    model = tiny_model()
    original = model.model.layers[-1].mlp
    adapter = ExpertAdapter(model, LoraSpec())
    assert isinstance(model.model.layers[-1].mlp, ExpertMLP)
    x = torch.randn(1, 4, 64)
    adapter.activate(_experts(adapter, 2, LoraSpec()))
    adapter.activate([])
    assert torch.equal(model.model.layers[-1].mlp(x), original(x))
    adapter.detach()
    assert model.model.layers[-1].mlp is original


def test_last_n_layers_placement():
    model = tiny_model(layers=3)
    adapter = ExpertAdapter(model, LoraSpec(n_layers=2))
    assert adapter.layer_ids == [1, 2]
    (e,) = _experts(adapter, 1, LoraSpec(n_layers=2))
    assert e.layers == [1, 2]
    with pytest.raises(ValueError, match="n_layers"):
        ExpertAdapter(tiny_model(layers=2), LoraSpec(n_layers=3))


def test_model_without_gated_mlp_is_refused():
    model = tiny_model()
    del model.model.layers[-1].mlp.gate_proj
    with pytest.raises(UnsupportedModelError, match="gate/up/down"):
        check_supported(model, 1)

    class NotADecoder(torch.nn.Module):
        pass

    with pytest.raises(UnsupportedModelError, match="model.layers"):
        check_supported(NotADecoder(), 1)


def test_wrong_shape_expert_is_refused():
    adapter = ExpertAdapter(tiny_model(), LoraSpec())
    other = ExpertAdapter(tiny_model(layers=3), LoraSpec())
    (e,) = _experts(other, 1, LoraSpec())
    with pytest.raises(ExpertFormatError):
        adapter.activate([e])


def test_int8_storage_has_one_scale_per_rank_channel_within_half_a_step():
    from dmoe.experts.format import decode_weights, encode_weights, quantize_int8

    a = torch.randn(4, 40) * torch.logspace(-3, 1, 4)[:, None]  # A (r, in): rows of any scale
    a[2] = 0.0
    b = torch.randn(40, 4) * torch.logspace(-3, 1, 4)[None, :]  # B (out, r): columns likewise
    for w, axis in ((a, 1), (b, 0)):
        q, s = quantize_int8(w)
        assert q.dtype == torch.int8 and int(q.abs().max()) == 127
        assert s.shape == ((4, 1) if axis == 1 else (1, 4))  # r scales, not one per output row
        err = (q.float() * s - w).abs().amax(dim=axis, keepdim=True)
        assert bool((err <= s / 2 * (1 + 1e-5)).all())  # rounding: at most half a step
    q, s = quantize_int8(a)
    assert s[2, 0] == 1.0 and not q[2].any()  # an all-zero channel
    stored = encode_weights({"x.lora_A": a, "x.lora_B": b}, "int8")
    assert set(stored) == {"x.lora_A", "x.lora_A.scale", "x.lora_B", "x.lora_B.scale"}
    torch.testing.assert_close(decode_weights(stored)["x.lora_A"], q.float() * s)
    with pytest.raises(ExpertFormatError, match="no per-channel scales"):
        decode_weights({"x.lora_A": q})


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
def test_expert_file_roundtrip(tmp_path, dtype):
    adapter = ExpertAdapter(tiny_model(), LoraSpec(rank=2, alpha=8))
    (e,) = _experts(adapter, 1, LoraSpec(rank=2, alpha=8))
    n = save_expert(tmp_path / "e.safetensors", e, base_fingerprint="abc", dtype=dtype)
    assert n == (tmp_path / "e.safetensors").stat().st_size
    back = load_expert(tmp_path / "e.safetensors", expected_fingerprint="abc")
    assert back.id == e.id and back.spec == e.spec
    meta = read_expert_metadata(tmp_path / "e.safetensors")
    assert (meta["dtype"], meta["version"]) == (dtype, "3" if dtype == "int8" else "2")
    tol = 0 if dtype == "float32" else 1e-2
    for k, v in e.weights.items():
        torch.testing.assert_close(back.weights[k].float(), v, atol=tol, rtol=tol)
    assert not list(tmp_path.glob(".tmp-*"))
    with pytest.raises(ExpertFormatError, match="trained for base model"):
        load_expert(tmp_path / "e.safetensors", expected_fingerprint="other")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ExpertFormatError):
        load_expert(tmp_path / "junk.safetensors")
