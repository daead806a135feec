"""Loading and running transformers models with every tier mix: outputs bit-identical to the model loaded normally."""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch
from bigmodels import build, run, save

from shardkit import (
    CheckpointError,
    UsageError,
    cpu_offload,
    disk_offload,
    dispatch_model,
    init_empty_weights,
    load_checkpoint_and_dispatch,
    load_checkpoint_in_model,
    remove_hooks,
)
from shardkit.bigmodel.offload import INDEX_NAME

KINDS = ["llama", "opt", "gpt2", "bert", "t5"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each model saved sharded (transformers' save_pretrained, 20 KB shards), with its reference output."""
    out = {}
    for kind in KINDS:
        model = build(kind)
        folder = save(model, tmp_path_factory.mktemp(kind))
        assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) > 3
        out[kind] = (folder, run(model, kind))
    return out


def mixed_map(model) -> dict:
    """Alternate cpu and disk over the repeated blocks, the rest on cpu: every tier boundary gets crossed."""
    blocks = [n for n, m in model.named_modules() if type(m).__name__ in set(model._no_split_modules or [])]
    device_map = {name: ("disk" if i % 2 else "cpu") for i, name in enumerate(blocks)}
    for name, _ in model.named_children():
        device_map.setdefault(name, "cpu")
    # top-level children containing blocks must not cover them: split them into their own children
    for name in list(device_map):
        if any(b.startswith(name + ".") for b in blocks):
            del device_map[name]
            for child, _ in model.get_submodule(name).named_children():
                full = f"{name}.{child}"
                if not any(b == full or b.startswith(full + ".") for b in blocks):
                    device_map[full] = "cpu"
                elif full not in device_map:
                    for sub, _ in model.get_submodule(full).named_children():
                        device_map.setdefault(f"{full}.{sub}", "cpu")
    return device_map


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tiers", ["cpu", "mixed", "disk"])
def test_tier_mixes_are_bit_identical(saved, kind, tiers, tmp_path):
    folder, want = saved[kind]
    model = build(kind, empty=True)
    device_map = {"cpu": {"": "cpu"}, "disk": {"": "disk"}, "mixed": mixed_map(model)}[tiers]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no missing or unexpected keys
        model = load_checkpoint_and_dispatch(model, folder, device_map=device_map, offload_folder=tmp_path, force_hooks=True)
    assert model.hf_device_map == device_map
    assert torch.equal(run(model, kind), want)
    assert torch.equal(run(model, kind), want)  # second forward: learned order, staged slabs reused


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_auto_map_with_cpu_budget_offloads_to_disk(saved, kind, tmp_path):
    folder, want = saved[kind]
    model = build(kind, empty=True)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model = load_checkpoint_and_dispatch(
        model, folder, device_map="auto", max_memory={"cpu": total * 3 // 4}, offload_folder=tmp_path
    )
    assert {"cpu", "disk"} <= set(model.hf_device_map.values())
    assert torch.equal(run(model, kind), want)


def test_safetensors_disk_tier_points_into_the_checkpoint(saved, tmp_path):
    folder, want = saved["llama"]
    model = load_checkpoint_and_dispatch(build("llama", empty=True), folder, device_map={"": "disk"}, offload_folder=tmp_path)
    assert os.listdir(tmp_path) == [INDEX_NAME]  # no second copy of the weights
    files = {stored.file for stored in model._shardkit_offload.tensors.values()}
    assert files and all(os.path.dirname(f) == str(folder) for f in files)
    assert torch.equal(run(model, "llama"), want)


def test_dtype_cast_on_disk_is_written_once(saved, tmp_path):
    folder, _ = saved["llama"]
    reference = build("llama")
    for param in reference.parameters():  # floating checkpoint tensors are cast; the computed rotary buffer is not
        param.data = param.data.to(torch.bfloat16)
    model = load_checkpoint_and_dispatch(
        build("llama", empty=True), folder, device_map={"": "disk"}, offload_folder=tmp_path, dtype="bf16"
    )
    written = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert written and all(t.dtype == "BF16" for t in model._shardkit_offload.tensors.values())
    assert torch.equal(run(model, "llama"), run(reference, "llama"))


def test_disk_without_folder_when_weights_must_be_written(saved):
    folder, _ = saved["llama"]
    with pytest.raises(UsageError, match="pass offload_folder"):
        load_checkpoint_and_dispatch(build("llama", empty=True), folder, device_map={"": "disk"}, dtype=torch.float16)


def test_bin_checkpoint_on_disk_tier(tmp_path):
    from builders import save_bin

    reference = build("gpt2")
    source = save_bin(
        {k: v.clone() for k, v in reference.state_dict().items() if k != "lm_head.weight"}, tmp_path / "pytorch_model.bin"
    )
    model = load_checkpoint_and_dispatch(
        build("gpt2", empty=True), source, device_map={"": "disk"}, offload_folder=tmp_path / "off"
    )
    assert any(f.endswith(".safetensors") for f in os.listdir(tmp_path / "off"))  # torch zip bytes are copied once
    assert torch.equal(run(model, "gpt2"), run(reference, "gpt2"))


def test_minilm_disk_offload_matches_transformers(minilm, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel

    reference = AutoModel.from_pretrained(minilm).eval()
    # transformers leaves weights in the mmapped file, at addresses not 64-byte aligned, where CPU matmul kernels
    # round differently (pooler output off by 3e-8); give them their own aligned memory, as shardkit's loader does.
    for param in reference.parameters():
        param.data = param.data.clone()
    with init_empty_weights():
        model = AutoModel.from_config(AutoConfig.from_pretrained(minilm)).eval()
    device_map = {
        "embeddings": "cpu",
        "encoder.layer.0": "disk",
        "encoder.layer.1": "cpu",
        "encoder.layer.2": "disk",
        "encoder.layer.3": "disk",
        "encoder.layer.4": "cpu",
        "encoder.layer.5": "disk",
        "pooler": "disk",
    }
    model = load_checkpoint_and_dispatch(model, minilm, device_map=device_map, offload_folder=tmp_path)
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 6251, 102]])
    with torch.no_grad():
        want, got = reference(input_ids=ids), model(input_ids=ids)
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)
    assert torch.equal(got.pooler_output, want.pooler_output)


def test_tied_embeddings_stay_tied(saved):
    folder, want = saved["gpt2"]
    model = build("gpt2", empty=True)
    load_checkpoint_in_model(model, folder)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.device.type == "cpu"
    assert torch.equal(run(model, "gpt2"), want)


@pytest.mark.parametrize("wte,head", [("disk", "disk"), ("cpu", "disk"), ("disk", "cpu")])
def test_weights_tied_across_offloaded_blocks(saved, wte, head, tmp_path):
    """The LM head and the embedding share one tensor but run as two blocks: each block gets its own view."""
    folder, want = saved["gpt2"]
    device_map = {
        "transformer.wte": wte,
        "transformer.wpe": "cpu",
        "transformer.drop": "cpu",
        "transformer.h": "disk",
        "transformer.ln_f": "cpu",
        "lm_head": head,
    }
    model = load_checkpoint_and_dispatch(build("gpt2", empty=True), folder, device_map=device_map, offload_folder=tmp_path)
    assert torch.equal(run(model, "gpt2"), want)


def test_aliases_recorded_in_metadata_are_reloaded(tmp_path):
    """huggingface_hub stores a tied tensor once and records the dropped name in the index metadata; a model whose
    two names are separate tensors gets both filled from the one stored copy (strict: nothing is missing)."""
    import copy

    import orjson
    from builders import save_sharded
    from transformers import GPT2LMHeadModel

    reference = build("gpt2")
    state = dict(reference.state_dict())
    save_sharded(state, tmp_path, "20KB")
    index = orjson.loads((tmp_path / "model.safetensors.index.json").read_bytes())
    dropped = {"lm_head.weight", "transformer.wte.weight"} - set(index["weight_map"])
    assert len(dropped) == 1 and dropped <= set(index["metadata"])
    config = copy.deepcopy(reference.config)
    config.tie_word_embeddings = False
    untied = GPT2LMHeadModel(config)
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    load_checkpoint_in_model(untied, tmp_path, strict=True)
    assert torch.equal(untied.lm_head.weight, reference.transformer.wte.weight)
    assert torch.equal(untied.transformer.wte.weight, reference.transformer.wte.weight)


def test_missing_keys_warn_by_default_and_raise_when_strict(saved, tmp_path, caplog):
    folder, _ = saved["llama"]
    from builders import save_safetensors

    state = build("llama").state_dict()
    del state["model.layers.1.mlp.up_proj.weight"]
    save_safetensors(state, tmp_path / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="shardkit.bigmodel.loader"):
        load_checkpoint_in_model(build("llama"), tmp_path)
    assert "not initialized from the model checkpoint" in caplog.text and "model.layers.1.mlp.up_proj.weight" in caplog.text
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight") as info:
        load_checkpoint_in_model(build("llama"), tmp_path, strict=True)
    assert info.value.code == "missing-keys"


def test_missing_key_of_an_empty_model_always_raises(tmp_path):
    from builders import save_safetensors

    state = build("llama").state_dict()
    del state["model.norm.weight"]
    save_safetensors(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.norm.weight.*meta") as info:
        load_checkpoint_and_dispatch(build("llama", empty=True), tmp_path, device_map={"": "cpu"})
    assert info.value.code == "missing-keys"


def test_unexpected_keys(tmp_path, caplog):
    from builders import save_safetensors

    state = build("llama").state_dict()
    state["extra.weight"] = torch.ones(3)
    save_safetensors(state, tmp_path / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="shardkit.bigmodel.loader"):
        result = load_checkpoint_in_model(build("llama"), tmp_path)
    assert "were not used when initializing" in caplog.text and "extra.weight" in caplog.text
    assert result.unexpected_keys == ["extra.weight"] and result.missing_keys == []
    for caught in (CheckpointError, RuntimeError, ValueError):  # torch's strict load and accelerate raise these
        with pytest.raises(caught, match="Unexpected key.*extra.weight"):
            load_checkpoint_in_model(build("llama"), tmp_path, strict=True)


def test_shape_mismatch_names_the_tensor(tmp_path):
    from builders import save_safetensors

    state = build("llama").state_dict()
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(16, 32)
    save_safetensors(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.layers.0.self_attn.q_proj.weight.*\[16, 32\].*\[32, 32\]") as info:
        load_checkpoint_in_model(build("llama", empty=True), tmp_path)
    assert info.value.code == "shape-mismatch"


def test_device_map_naming_a_missing_module(saved):
    folder, _ = saved["llama"]
    with pytest.warns(UserWarning, match="'model.layers.7'"):
        load_checkpoint_and_dispatch(build("llama", empty=True), folder, device_map={"model.layers.7": "cpu", "": "cpu"})


def test_device_map_leaving_a_module_out(saved):
    folder, _ = saved["llama"]
    with pytest.raises(UsageError, match="any device for the following parameters: 'lm_head.weight'"):
        load_checkpoint_and_dispatch(build("llama", empty=True), folder, device_map={"model": "cpu"})


def test_changed_or_truncated_offload_files_are_refused(saved, tmp_path):
    folder, want = saved["llama"]
    offload = tmp_path / "off"
    model = load_checkpoint_and_dispatch(
        build("llama", empty=True), folder, device_map={"": "disk"}, offload_folder=offload, dtype="bf16"
    )
    remove_hooks(model)
    # Reopening the folder works while the files are intact...
    model = build("llama", empty=True).to(torch.bfloat16)
    dispatch_model(model, {"": "disk"}, offload_dir=offload)
    run(model, "llama")
    # ...and is refused, naming the file, once one is truncated or its header edited.
    victim = next(p for p in offload.iterdir() if p.suffix == ".safetensors")
    data = victim.read_bytes()
    victim.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=f"{victim.name}.*changed or truncated") as info:
        dispatch_model(build("llama", empty=True).to(torch.bfloat16), {"": "disk"}, offload_dir=offload)
    assert info.value.code == "offload-changed"
    victim.write_bytes(data[:20] + (b"X" if data[20:21] != b"X" else b"Y") + data[21:])
    with pytest.raises(CheckpointError, match="header changed"):
        dispatch_model(build("llama", empty=True).to(torch.bfloat16), {"": "disk"}, offload_dir=offload)


def test_batchnorm_on_disk_keeps_running_statistics(tmp_path):
    from builders import save_safetensors

    torch.manual_seed(0)

    def net():
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 3), torch.nn.BatchNorm2d(2)
        )

    reference = net()
    reference.train()
    for _ in range(3):
        reference(torch.randn(4, 3, 8, 8))  # move the running statistics away from their initial values
    reference.eval()
    save_safetensors(reference.state_dict(), tmp_path / "model.safetensors")
    x = torch.randn(2, 3, 8, 8)
    for offload_buffers in (False, True):
        with init_empty_weights():
            model = net().eval()
        device_map = {"0": "cpu", "1": "disk", "2": "cpu", "3": "disk", "4": "disk"}
        load_checkpoint_and_dispatch(
            model, tmp_path, device_map=device_map, offload_folder=tmp_path / "off", offload_buffers=offload_buffers
        )
        with torch.no_grad():
            assert torch.equal(model(x), reference(x))
        if not offload_buffers:
            assert torch.equal(model[1].running_mean, reference[1].running_mean)
            assert model[1].num_batches_tracked.item() == 3


def test_cpu_offload_and_disk_offload_of_a_loaded_model(tmp_path):
    reference = build("llama")
    want = run(reference, "llama")
    model = build("llama")
    cpu_offload(model, execution_device="cpu")
    assert torch.equal(run(model, "llama"), want)
    remove_hooks(model)
    model = build("llama")
    disk_offload(model, tmp_path, execution_device="cpu")
    assert all(p.device.type == "meta" for p in model.model.layers.parameters())
    assert torch.equal(run(model, "llama"), want)
    with pytest.raises(UsageError, match="offload_dir"):
        disk_offload(build("llama"), None)


def test_remove_hooks_restores_plain_forward(saved, tmp_path):
    folder, want = saved["llama"]
    model = load_checkpoint_and_dispatch(
        build("llama", empty=True), folder, device_map={"model": "cpu", "lm_head": "disk"}, offload_folder=tmp_path
    )
    assert "forward" in model.model.__dict__
    remove_hooks(model)
    assert "forward" not in model.model.__dict__ and "forward" not in model.__dict__
    assert model.model.embed_tokens.weight.device.type == "cpu"


def test_out_of_memory_in_a_block_names_it_and_leaves_the_model_usable(saved, tmp_path):
    from shardkit.bigmodel import OutOfMemoryError

    folder, want = saved["llama"]
    model = load_checkpoint_and_dispatch(
        build("llama", empty=True), folder, device_map=mixed_map(build("llama", empty=True)), offload_folder=tmp_path
    )
    layer = model.model.layers[1]  # on the disk tier in the mixed map
    mlp_class = type(layer.mlp)
    original = mlp_class.forward
    calls = {"n": 0}

    def failing(self, *args, **kwargs):
        if self is not layer.mlp:
            return original(self, *args, **kwargs)
        calls["n"] += 1
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    mlp_class.forward = failing
    try:
        with pytest.raises(OutOfMemoryError, match=r"block model.layers.1 .*smaller max_memory") as info:
            run(model, "llama")
        assert isinstance(info.value, torch.OutOfMemoryError) and info.value.code == "gpu-oom"
    finally:
        mlp_class.forward = original
    assert calls["n"] == 1
    assert layer.mlp.up_proj.weight.device.type == "meta"  # weights back at rest
    assert torch.equal(run(model, "llama"), want)
