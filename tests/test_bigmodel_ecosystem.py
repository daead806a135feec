"""transformers, PEFT and diffusers on models shardkit dispatched: what they read on ``_hf_hook`` works (issue 11).

Each runs real library code on a tiny model on the CPU and compares with the same model never offloaded.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from bigmodels import build, inputs, save  # noqa: E402

from shardkit import cpu_offload, disk_offload, load_checkpoint_and_dispatch  # noqa: E402

MIXED = {
    "model.embed_tokens": "cpu",
    "model.layers": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "disk",
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    save(build("llama"), folder)
    return folder


@pytest.mark.parametrize("device_map", [{"": "disk"}, MIXED], ids=["all-disk", "mixed"])
def test_generate_on_an_offloaded_model(llama, device_map, tmp_path):
    ids = inputs("llama")["input_ids"][:1]
    want = build("llama").generate(ids, max_new_tokens=6, do_sample=False)
    model = load_checkpoint_and_dispatch(build("llama", empty=True), llama, device_map=device_map, offload_folder=tmp_path)
    assert model._hf_hook.execution_device == torch.device("cpu") and model._hf_hook.io_same_device
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), want)


def test_save_pretrained_of_a_disk_offloaded_model_reads_weights_through_the_hook(llama, tmp_path):
    from safetensors.torch import load_file

    model = load_checkpoint_and_dispatch(build("llama", empty=True), llama, device_map=MIXED, offload_folder=tmp_path / "o")
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    model.save_pretrained(tmp_path / "saved")  # transformers' load_offloaded_parameter reads _hf_hook.weights_map
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    for name, value in build("llama").state_dict().items():
        if name in saved:
            assert torch.equal(saved[name], value), name


@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload", "load"])
def test_peft_lora_loaded_onto_an_offloaded_model_and_merged(llama, how, tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(build("llama"), config).save_pretrained(tmp_path / "lora")
    ids = inputs("llama")["input_ids"]
    want = peft.PeftModel.from_pretrained(build("llama"), tmp_path / "lora").merge_and_unload()(ids).logits
    assert not torch.allclose(want, build("llama")(ids).logits, atol=1e-3)  # the adapter changes the outputs

    if how == "cpu_offload":
        model = cpu_offload(build("llama"), execution_device="cpu")
    elif how == "disk_offload":
        model = disk_offload(build("llama"), tmp_path / "off", execution_device="cpu")
    else:
        model = load_checkpoint_and_dispatch(build("llama", empty=True), llama, device_map=MIXED, offload_folder=tmp_path / "o")
    adapted = peft.PeftModel.from_pretrained(model, tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, want, atol=1e-5, rtol=1e-5)
        merged = adapted.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_diffusers_component_loaded_through_shardkit(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from shardkit import init_empty_weights

    config = dict(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    torch.manual_seed(0)
    reference = diffusers.UNet2DModel(**config).eval()
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([10])
    with torch.no_grad():
        want = reference(x, t).sample
    reference.save_pretrained(tmp_path / "unet")
    with init_empty_weights():
        unet = diffusers.UNet2DModel.from_config(diffusers.UNet2DModel.load_config(tmp_path / "unet")).eval()
    device_map = {name: ("disk" if i % 2 else "cpu") for i, (name, _) in enumerate(unet.named_children())}
    unet = load_checkpoint_and_dispatch(unet, tmp_path / "unet", device_map=device_map, offload_folder=tmp_path / "off")
    assert unet.down_blocks[0].resnets[0].conv1.weight.device.type == "meta"
    with torch.no_grad():
        assert torch.equal(unet(x, t).sample, want)
    # what a pipeline's _execution_device reads to place latents
    assert any(getattr(m, "_hf_hook", None) is not None and m._hf_hook.execution_device is not None for m in unet.modules())
