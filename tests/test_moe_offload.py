"""Mixture-of-experts offloading: only the experts the router chose are staged, and outputs stay bitwise equal.

On a CPU machine the disk tier runs the routed path synchronously (reads of the chosen experts' byte ranges
straight from the safetensors file); the CPU-tier copy path is exercised through the streamer directly.
"""

from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402

from shardkit import init_empty_weights, load_checkpoint_and_dispatch  # noqa: E402
from shardkit.bigmodel import experts as experts_mod  # noqa: E402
from shardkit.bigmodel.experts import ExpertCache, layout_for, stage_experts  # noqa: E402
from shardkit.bigmodel.hooks import Block, Streamer  # noqa: E402
from shardkit.bigmodel.offload import OffloadStore  # noqa: E402

LAYERS = 2
EXPERTS = 8


def qwen3_moe():
    config = transformers.Qwen3MoeConfig(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=EXPERTS,
        num_experts_per_tok=2,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=100,
    )
    return config, transformers.Qwen3MoeForCausalLM, "mlp"


def mixtral():
    config = transformers.MixtralConfig(
        hidden_size=64,
        intermediate_size=48,
        num_local_experts=EXPERTS,
        num_experts_per_tok=2,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=100,
    )
    return config, transformers.MixtralForCausalLM, "mlp"


def experts_map(mlp: str) -> dict:
    """Everything on the CPU (the execution device here) but each layer's experts, on disk."""
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    for i in range(LAYERS):
        for part in ("self_attn", "input_layernorm", "post_attention_layernorm", f"{mlp}.gate"):
            device_map[f"model.layers.{i}.{part}"] = "cpu"
        device_map[f"model.layers.{i}.{mlp}.experts"] = "disk"
    return device_map


@pytest.fixture(params=[qwen3_moe, mixtral], ids=["qwen3_moe", "mixtral"])
def moe(request, tmp_path):
    config, cls, mlp = request.param()
    torch.manual_seed(0)
    model = cls(config).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    return model, cls, config, mlp, tmp_path


def dispatched(moe, **kwargs):
    model, cls, config, mlp, folder = moe
    with init_empty_weights():
        empty = cls(config).eval()
    empty.config._experts_implementation = model.config._experts_implementation
    return load_checkpoint_and_dispatch(empty, folder, device_map=experts_map(mlp), offload_folder=folder / "offload", **kwargs)


def hook_block(model, layer: int, mlp: str):
    return getattr(model.model.layers[layer], mlp).experts._shardkit_hook.block


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
def test_routed_outputs_are_bitwise_the_dense_ones(moe, implementation):
    model, _, _, mlp, _ = moe
    model.config._experts_implementation = implementation
    offloaded = dispatched(moe)
    torch.manual_seed(1)
    for shape in [(1, 1), (1, 6), (2, 3)]:
        tokens = torch.randint(0, 100, shape)
        assert torch.equal(offloaded(tokens).logits, model(tokens).logits), shape
    stats = hook_block(offloaded, 0, mlp).experts.stats
    assert stats["routed"] == 3 and stats["dense"] == 0


def test_reads_only_the_chosen_experts(moe, monkeypatch):
    model, _, _, mlp, _ = moe
    offloaded = dispatched(moe)
    read = []
    original = OffloadStore.read_into
    monkeypatch.setattr(
        OffloadStore,
        "read_into",
        lambda self, path, offset, dest: (read.append(len(dest)), original(self, path, offset, dest))[1],
    )
    tokens = torch.tensor([[7]])
    assert torch.equal(offloaded(tokens).logits, model(tokens).logits)
    block = hook_block(offloaded, 0, mlp)
    per_expert = sum(block.experts.per_expert.values())
    # one token routes to top-2 experts in each layer: two experts' bytes per layer, not the whole block
    assert sum(read) == LAYERS * 2 * per_expert
    assert sum(read) < block.nbytes


def test_long_prefill_falls_back_to_the_whole_block(moe):
    model, _, _, mlp, _ = moe
    offloaded = dispatched(moe)
    tokens = torch.randint(0, 100, (4, 64))  # routes to every expert
    assert torch.equal(offloaded(tokens).logits, model(tokens).logits)
    stats = hook_block(offloaded, 0, mlp).experts.stats
    assert stats == {"forwards": 1, "routed": 0, "dense": 1, "experts": 0}


def test_expert_cache_hits_cost_no_read(moe, monkeypatch):
    model, _, _, mlp, _ = moe
    offloaded = dispatched(moe, expert_cache=64 * 1024 * 1024)
    cache = offloaded._shardkit_streamer.expert_cache
    assert cache.capacity >= LAYERS * EXPERTS
    tokens = torch.tensor([[3, 5]])
    first = offloaded(tokens).logits
    reads = []
    monkeypatch.setattr(OffloadStore, "read_into", lambda *a: reads.append(a))
    second = offloaded(tokens).logits  # the same tokens route to the same experts: all hits
    assert reads == []
    assert torch.equal(first, model(tokens).logits) and torch.equal(second, first)
    stats = cache.stats()
    assert stats["hits"] == stats["misses"] > 0 and stats["hit_rate"] == 0.5


def test_small_cache_evicts_least_recently_used_and_stays_exact(moe):
    model, _, _, mlp, _ = moe
    block_bytes = None
    offloaded = dispatched(moe, expert_cache=1)  # too small for one expert: no slots
    assert offloaded._shardkit_streamer.expert_cache.capacity == 0
    block_bytes = hook_block(offloaded, 0, mlp).experts.expert_bytes
    offloaded = dispatched(moe, expert_cache=3 * block_bytes)
    torch.manual_seed(2)
    for _ in range(4):
        tokens = torch.randint(0, 100, (1, 3))
        assert torch.equal(offloaded(tokens).logits, model(tokens).logits)
    cache = offloaded._shardkit_streamer.expert_cache
    assert cache.capacity == 3 and len(cache.entries) == 3


def test_generate_gives_the_same_tokens(moe):
    model, _, _, _, _ = moe
    offloaded = dispatched(moe, expert_cache="1MB")
    prompt = torch.tensor([[1, 2, 3, 4]])
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(offloaded.generate(prompt, max_new_tokens=6, do_sample=False), expected)


def test_routed_experts_off_streams_whole_blocks(moe):
    model, _, _, mlp, _ = moe
    offloaded = dispatched(moe, routed_experts=False)
    assert hook_block(offloaded, 0, mlp).experts is None
    tokens = torch.tensor([[9]])
    assert torch.equal(offloaded(tokens).logits, model(tokens).logits)


class OldStyleExperts(torch.nn.Module):
    """Expert weights in 3-D tensors but a forward without the router's choice: not routable."""

    def __init__(self):
        super().__init__()
        self.num_experts = 4
        self.gate_up_proj = torch.nn.Parameter(torch.randn(4, 6, 3))

    def forward(self, x):
        return x @ self.gate_up_proj.sum(0)[:3]


def test_module_without_the_interface_is_dense_with_one_info_line(caplog):
    module = OldStyleExperts()
    block = Block("layers.0.experts", module, torch.device("cpu"), "cpu")
    block.slots = {"gate_up_proj": experts_mod.slab.layout([("gate_up_proj", torch.float32, (4, 6, 3))])[0]["gate_up_proj"]}
    with caplog.at_level(logging.INFO, logger="shardkit.bigmodel.experts"):
        assert layout_for(block) is None
    assert "transformers 5 experts interface" in caplog.text and "layers.0.experts" in caplog.text


def cpu_tier_experts_block(name: str, module) -> tuple[Block, dict]:
    """``module`` (an experts module) as a CPU-tier block with routed fetch, and copies of its weights by name."""
    specs = [(n, p.dtype, tuple(p.shape)) for n, p in module.named_parameters()]
    slots, nbytes = experts_mod.slab.layout(specs)
    block = Block(name, module, torch.device("cpu"), "cpu", slots=slots, nbytes=nbytes)
    block.places = [(module, n, True, n) for n, _ in module.named_parameters()]
    block.host = torch.empty(nbytes, dtype=torch.uint8)
    originals = {n: p.detach().clone() for n, p in module.named_parameters()}
    for n, p in originals.items():
        experts_mod.slab.view(block.host, slots[n]).copy_(p)
    block.experts = layout_for(block)
    return block, originals


def test_cpu_tier_copies_only_chosen_slices_into_a_compact_slab():
    """The host-to-device path (CPU tier) on a CPU 'device': compact tensors are exactly the chosen slices."""
    config, cls, mlp = qwen3_moe()
    torch.manual_seed(0)
    block, originals = cpu_tier_experts_block("experts", getattr(cls(config).model.layers[0], mlp).experts)
    streamer = Streamer(torch.device("cpu"), [block])
    streamer.expert_cache = ExpertCache(torch.device("cpu"), 2 * block.experts.expert_bytes, block.experts.expert_bytes)
    for chosen in ([1, 2, 6], [2, 6, 7], [0]):
        slot, tensors = stage_experts(streamer, block, chosen)
        for (_, name, _, _), tensor in zip(block.places, tensors):
            assert torch.equal(tensor, originals[name][chosen]), (chosen, name)
        streamer.release(block, slot)
    cache = streamer.expert_cache
    # Two slots: round 1 caches experts 1 and 2 (6 finds every slot kept for this round); round 2 hits 2 and
    # caches 6 in place of 1; round 3 misses 0 and evicts 2, the least recently used.
    assert (cache.hits, cache.misses) == (1, 6)
    assert set(cache.entries) == {("experts", 6), ("experts", 0)}


def test_experts_offload_plan_keeps_all_else_on_the_main_device_and_fills_it_layer_by_layer():
    from shardkit.bigmodel.measure import compute_module_sizes, expert_modules, module_tree
    from shardkit.bigmodel.placement import STAGING_SLOTS, plan_experts

    config, cls, _ = qwen3_moe()
    config.num_hidden_layers = 6
    with init_empty_weights():
        model = cls(config)
    sizes = compute_module_sizes(model)
    experts = expert_modules(model)
    assert experts == {f"model.layers.{i}.mlp.experts": EXPERTS for i in range(6)}
    experts = list(experts)
    block = sizes[experts[0]]
    rest = sizes[""] - 6 * block
    # Room for everything else, the staging slabs and two layers' experts on GPU 0; the CPU takes the rest.
    budget = {0: rest + STAGING_SLOTS * block + 2 * block, "cpu": 4 * block, "disk": 0}
    device_map = plan_experts(module_tree(model), sizes, budget, experts)
    assert device_map == {"": 0, **dict(zip(experts, [0, 0, "cpu", "cpu", "cpu", "cpu"]))}
    # Once the disk is used, the CPU also holds the two read buffers that disk blocks pass through.
    budget["cpu"] = 3 * block
    assert list(plan_experts(module_tree(model), sizes, budget, experts).values()) == [0, 0, 0, "cpu"] + ["disk"] * 3
    budget["cpu"] = 2 * block
    assert list(plan_experts(module_tree(model), sizes, budget, experts).values()) == [0, 0, 0] + ["disk"] * 4
    assert plan_experts(module_tree(model), sizes, {0: sizes[""]}, experts) == {"": 0}
    with pytest.raises(shardkit_errors().UsageError, match="other than routed experts"):
        plan_experts(module_tree(model), sizes, {0: rest - 1, "cpu": sizes[""]}, experts)


def shardkit_errors():
    import shardkit.errors

    return shardkit.errors


def test_experts_offload_map_loads_and_runs_bitwise(moe):
    from shardkit import infer_auto_device_map

    model, cls, config, mlp, folder = moe
    with init_empty_weights():
        empty = cls(config).eval()
    from shardkit.bigmodel.measure import compute_module_sizes

    sizes = compute_module_sizes(empty)
    block = sizes[f"model.layers.0.{mlp}.experts"]
    # The CPU runs everything: one layer's experts would fit beside the rest, but once a block is on disk the
    # CPU also holds two staging slabs for it, so both go to disk.
    device_map = infer_auto_device_map(empty, max_memory={"cpu": sizes[""] - block // 2}, experts_offload=True)
    assert device_map == {"": "cpu", **{f"model.layers.{i}.{mlp}.experts": "disk" for i in range(LAYERS)}}
    loaded = load_checkpoint_and_dispatch(empty, folder, device_map=device_map, offload_folder=folder / "offload")
    tokens = torch.tensor([[5, 6, 7]])
    assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    assert hook_block(loaded, 1, mlp).experts.stats["routed"] == 1
    with pytest.raises(shardkit_errors().UsageError, match="no experts modules"):
        infer_auto_device_map(torch.nn.Linear(2, 2), max_memory={"cpu": 10}, experts_offload=True)


@pytest.mark.parametrize("where", ["cpu", "disk"])
def test_loads_per_expert_checkpoints_as_save_pretrained_writes_them(moe, where):
    """transformers 5's save_pretrained (and the Hub) store one tensor per expert; the model holds them packed."""
    from safetensors import safe_open

    model, cls, config, mlp, folder = moe
    saved = folder / "hub-layout"
    model.save_pretrained(saved)
    with safe_open(saved / "model.safetensors", "pt") as handle:
        names = list(handle.keys())
    assert not any(n.endswith("gate_up_proj") for n in names) and any(".experts.3." in n for n in names)
    with init_empty_weights():
        empty = cls(config).eval()
    empty.config._experts_implementation = model.config._experts_implementation
    device_map = experts_map(mlp) if where == "disk" else {"": "cpu"}
    loaded = load_checkpoint_and_dispatch(empty, saved, device_map=device_map, strict=True)
    tokens = torch.tensor([[4, 8, 15, 16]])
    assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    if where == "disk":
        # the disk tier reads the experts where save_pretrained put them: no offload folder was needed
        store = loaded._shardkit_offload
        stored = store.tensors[f"model.layers.0.{mlp}.experts.gate_up_proj"]
        assert len(stored.pieces) >= EXPERTS and sum(n for _, _, n in stored.pieces) == stored.nbytes
        assert hook_block(loaded, 0, mlp).experts.stats["routed"] == 1


def test_stored_pieces_locate_any_byte_range_and_survive_the_index(tmp_path):
    from shardkit.bigmodel.offload import Stored, stamp

    data = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(8, dtype=torch.int32), "b": torch.arange(100, 108, dtype=torch.int32)}, data)
    store = OffloadStore({}, {}, str(tmp_path))
    header = 8 + int.from_bytes(data.read_bytes()[:8], "little")
    # a tensor made of b's last 16 bytes then a's first 16: bytes [12, 20) straddle the two pieces
    stored = Stored(str(data), header + 48, 32, "I32", (8,), ((str(data), header + 48, 16), (str(data), header, 16)))
    assert stored.locate(12, 8) == [(str(data), header + 60, 4, 0), (str(data), header, 4, 4)]
    assert Stored(str(data), header, 32, "I32", (8,)).locate(4, 8) == [(str(data), header + 4, 8, 0)]
    store.tensors["t"] = stored
    store.stamps[str(data)] = stamp(str(data))
    store.save()
    reopened = OffloadStore.open(tmp_path)
    assert reopened.tensors["t"] == stored
    assert reopened.load("t").tolist() == [104, 105, 106, 107, 0, 1, 2, 3]


@pytest.mark.parametrize("layout", ["packed", "per-expert"])
def test_plan_cli_experts_offload_and_decode_traffic(moe, layout):
    import orjson
    from click.testing import CliRunner

    from shardkit.cli import main

    model, _, config, mlp, folder = moe
    source = folder / "cli"
    if layout == "packed":
        source.mkdir()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, source / "model.safetensors")
        config.save_pretrained(source)
    else:
        model.save_pretrained(source)
    per_layer = sum(p.numel() * p.element_size() for p in getattr(model.model.layers[0], mlp).experts.parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    # not all fits GPU 0; once experts are offloaded it holds two staging slabs beside the rest: both go to the CPU
    budget = f"0={total - per_layer // 2},cpu=1GB"
    for source_args in ([], ["--model-config", source / "config.json"]):
        result = CliRunner().invoke(
            main, ["plan", str(source), "--max-memory", budget, "--experts-offload", "--json", *map(str, source_args)]
        )
        assert result.exit_code == 0, result.output
        data = orjson.loads(result.output)
        expert_keys = [k for k in data["device_map"] if k.endswith(".experts")]
        assert data["device_map"][""] == 0 and [data["device_map"][k] for k in expert_keys] == ["cpu", "cpu"]
        assert data["moe"] == {
            "experts_modules": LAYERS,
            "top_k": 2,
            "dense_bytes_per_token": LAYERS * per_layer,
            "routed_bytes_per_token": LAYERS * per_layer * 2 // EXPERTS,
        }
    text = CliRunner().invoke(main, ["plan", str(source), "--max-memory", budget, "--experts-offload"]).output
    assert "with routed fetch" in text and "top-2 routing" in text
    plain = CliRunner().invoke(main, ["plan", str(source), "--max-memory", "0=1GB"])
    assert plain.exit_code == 0 and "streaming blocks whole" in plain.output


def test_no_room_for_staging_or_cache_is_a_clear_error_naming_the_block(moe, monkeypatch):
    from shardkit.bigmodel import slab
    from shardkit.bigmodel.hooks import OutOfMemoryError

    _, _, _, mlp, _ = moe
    original = slab.allocate

    def tight(nbytes, device="cpu", pin=False):
        if nbytes > 1 << 20:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate ...")
        return original(nbytes, device, pin)

    monkeypatch.setattr(slab, "allocate", tight)
    with pytest.raises(OutOfMemoryError, match=r"expert cache .* pass a smaller expert_cache"):
        dispatched(moe, expert_cache="64MB")

    def none(nbytes, device="cpu", pin=False):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(slab, "allocate", none)
    with pytest.raises(OutOfMemoryError, match=rf"staging slabs .* 'model\.layers\.\d\.{mlp}\.experts'"):
        dispatched(moe)


def test_routed_selection_does_not_overwrite_the_prefetched_next_block():
    """Two slabs (the GPU's ring, run on CPU), each layer's attention streamed and its experts routed: the next
    attention is staged while this one runs (before the router's choice is known) and stays staged, so every
    attention is copied once per forward, and every compact selection is the chosen slices."""
    config, cls, mlp = qwen3_moe()
    torch.manual_seed(0)
    model = cls(config)
    blocks, originals = [], {}
    for i, layer in enumerate(model.model.layers):
        attention = Block(f"attn{i}", None, torch.device("cpu"), "cpu", nbytes=4096)
        attention.host = torch.full((4096,), i + 1, dtype=torch.uint8)
        block, weights = cpu_tier_experts_block(f"experts{i}", getattr(layer, mlp).experts)
        originals.update({(block.name, n): w for n, w in weights.items()})
        blocks += [attention, block]

    staged = []

    class Counting(Streamer):
        def _stage(self, block, slot):
            staged.append(block.name)
            super()._stage(block, slot)

    streamer = Counting(torch.device("cpu"), blocks, ring=2)
    for forward in range(3):
        staged.clear()
        for i in range(0, len(blocks), 2):
            attention, experts = blocks[i : i + 2]
            slot = streamer.acquire(attention)
            assert torch.equal(streamer.slabs[slot][:4096], attention.host)
            streamer.release(attention, slot)
            chosen = [forward, 3 + i // 2, 7]
            slot, tensors = stage_experts(streamer, experts, chosen)
            for (_, name, _, _), tensor in zip(experts.places, tensors):
                assert torch.equal(tensor, originals[experts.name, name][chosen]), (experts.name, name)
            streamer.release(experts, slot)
        if forward:  # once the order is learned: each attention once, the first one for the next forward
            assert sorted(staged) == [f"attn{i}" for i in range(LAYERS)], staged
