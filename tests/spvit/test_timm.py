"""timm integration: registered names, pretrained_cfg, the generic `spvit` entry point loading a
searched architecture from arch.yaml + model.safetensors, and timm's model interface."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

import spvit
from spvit import ConfigError
from spvit.factory import registered_arch

torch.set_num_threads(1)


@pytest.mark.parametrize("name", spvit.REGISTERED_NAMES)
def test_registered_names_and_pretrained_cfg(name):
    assert name in timm.list_models("spvit*")
    spec = registered_arch(name)
    if name == "spvit_test":
        model = timm.create_model(name)
    else:
        with torch.device("meta"):
            model = timm.create_model(name)
    assert isinstance(model, spvit.SPViT) and model.spec == spec
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, spec.img_size, spec.img_size)
    assert cfg["num_classes"] == spec.num_classes
    assert cfg["first_conv"] == "patch_embed.conv1" and model.get_submodule(cfg["first_conv"])
    assert cfg["classifier"] == "head" and model.get_submodule("head") is model.get_classifier()
    assert len(cfg["mean"]) == len(cfg["std"]) == 3
    assert model.num_features == spec.num_features


def test_generic_entry_point_loads_safetensors(tmp_path):
    spec = spvit.ArchSpec(
        blocks=[{"heads": 2, "prior": ["mlp", "rpb"]}, {"heads": 2, "pool": True},
                {"heads": 2, "share": True}],
        img_size=16, patch_size=2, in_chans=1, num_classes=10, embed_dim=16, head="avg",
        init="impulse3", pos_embed="learned_sincos")
    source = spvit.create_model(spec, seed=0).eval()
    with torch.no_grad():
        source.blocks[0].attn.prior.rpb_table.normal_()
        source.blocks[0].attn.prior.mlp_weight.normal_()
    spec.save(tmp_path / "arch.yaml")
    save_file(source.state_dict(), str(tmp_path / "model.safetensors"))

    x = torch.randn(3, 1, 16, 16)
    same = timm.create_model("spvit", arch=str(tmp_path / "arch.yaml"), pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")),
                             num_classes=10).eval()
    torch.testing.assert_close(same(x), source(x), rtol=0, atol=0)
    assert same.pretrained_cfg["input_size"] == (1, 16, 16)

    other = timm.create_model("spvit", arch=str(tmp_path / "arch.yaml"), pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")),
                              num_classes=4).eval()
    assert other.get_classifier().out_features == 4 and other.spec.num_classes == 4
    torch.testing.assert_close(other.forward_head(other.forward_features(x), pre_logits=True),
                               source.forward_head(source.forward_features(x), pre_logits=True),
                               rtol=0, atol=0)

    # Fine-tuning at a larger size: the learned positional embedding and rpb tables resample.
    big = timm.create_model("spvit", arch=str(tmp_path / "arch.yaml"), pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")),
                            img_size=24)
    assert big.pos_embed.shape == (1, 144, 16)
    assert big.blocks[0].attn.prior.rpb_table.shape == (1, 23, 23)
    assert big(torch.randn(1, 1, 24, 24)).shape == (1, 10)

    with pytest.raises(ConfigError, match="does not exist"):
        timm.create_model("spvit", arch=str(tmp_path / "arch.yaml"), pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "missing.safetensors")))
    with pytest.raises(ConfigError, match="needs arch="):
        timm.create_model("spvit")
    with pytest.raises(ConfigError, match="takes no arch="):
        timm.create_model("spvit_test", arch=spec)


def test_timm_interface():
    model = timm.create_model("spvit_test", num_classes=6, img_size=48, seed=1).eval()
    assert model.spec.img_size == 48 and model.pretrained_cfg["input_size"] == (3, 32, 32)
    x = torch.randn(2, 3, 48, 48)
    feats = model.forward_features(x)
    assert feats.shape == (2, 1 + 9, model.num_features)  # class token + pooled 3x3 grid
    pooled = model.forward_head(feats, pre_logits=True)
    assert pooled.shape == (2, model.num_features)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    assert model(x).shape == (2, 6)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3 and model.spec.num_classes == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    model.reset_classifier(3, global_pool="avg")  # mean of the patch tokens, class token out
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats[:, 1:].mean(1))
    with pytest.raises(ConfigError, match="needs a class token"):
        timm.create_model("spvit", arch=registered_arch("spvit_test").replace(head="avg",
                                                                              cls_block=0),
                          global_pool="token")
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg["input_size"] == (3, 32, 32)


def test_spvit_create_model_accepts_registered_names():
    model = spvit.create_model("spvit_test", num_classes=2)
    assert model.pretrained_cfg["num_classes"] == 2
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2)
