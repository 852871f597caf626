"""Hugging Face ``transformers`` vision models (the ``hf`` extra): pruned, fine-tuned with the callbacks,
reloaded and exported like timm's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from pqv_lightning.errors import ConfigError  # noqa: E402
from pqv_lightning.outputs import main_tensor  # noqa: E402
from pqv_lightning.pruning import PruningConfig, StructuredPruner, count_macs, prune_once, restore_structure  # noqa: E402

_VIT = dict(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)


def _build(name: str, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    cls = getattr(transformers, name)
    config = {
        "SwinForImageClassification": dict(
            image_size=32, patch_size=4, embed_dim=32, depths=[1, 1], num_heads=[2, 4], window_size=4
        )
    }.get(name, {**_VIT, **kwargs})
    extra = {} if name.endswith("Model") else {"num_labels": 10}
    return cls(cls.config_class(**config, **extra)).eval()


def test_importing_the_package_does_not_import_transformers():
    code = "import sys, pqv_lightning, pqv_lightning.pruning; print('transformers' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


@pytest.mark.parametrize(
    "name",
    [
        "ViTForImageClassification",
        "DeiTForImageClassificationWithTeacher",
        "Dinov2ForImageClassification",
        "Dinov2Model",
    ],
)
@pytest.mark.parametrize("rule", [dict(), dict(prune_num_heads=True, prune_head_dims=False)])
def test_vit_like_models_prune_reload_and_keep_their_attention_attributes_in_step(name, rule):
    model, x = _build(name), torch.randn(2, 3, 32, 32)
    shape = tuple(main_tensor(model(x)).shape)
    pruner = StructuredPruner(model, PruningConfig(importance="l2", pruning_ratio=0.25, **rule))
    event = pruner.step()
    attn = model.get_submodule(next(iter(pruner.current_heads())))
    heads = 3 if rule else 4
    assert attn.num_attention_heads == heads and attn.q_proj.out_features == heads * attn.head_dim
    assert attn.head_dim == (16 if rule else 12) and attn.scaling == attn.head_dim**-0.5
    assert tuple(main_tensor(model(x)).shape) == shape and event.macs_after < 0.8 * event.macs_before
    fresh = restore_structure(_build(name, seed=1), json.loads(json.dumps(pruner.state_dict())))
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(main_tensor(fresh(x)), main_tensor(model(x)))
    if name == "Dinov2ForImageClassification":  # [CLS, mean] classifier: the embedding keeps its width
        assert model.classifier.in_features == 128 and "classifier" in pruner.ignored_names
        assert any("[CLS, patch mean]" in why for why in pruner.kept_whole.values())
    elif name != "Dinov2Model":  # ViT, DeiT: the embedding is pruned with the tokens
        backbone = model.vit if name.startswith("ViT") else model.deit
        assert backbone.embeddings.cls_token.shape[-1] == 48


def test_hf_swin_prunes_its_mlps_and_refuses_whole_heads():
    model, x = _build("SwinForImageClassification"), torch.randn(2, 3, 32, 32)
    pruner = StructuredPruner(model, PruningConfig(importance="l2", pruning_ratio=0.5))
    event = pruner.step()
    block = model.swin.encoder.layers[1].blocks[0]
    assert block.mlp.fc1.out_features == 128 and block.attention.q_proj.out_features == 64
    assert model(x).logits.shape == (2, 10) and event.macs_after < 0.9 * event.macs_before
    with pytest.raises(ConfigError, match="whole attention heads of SwinForImageClassification cannot be removed"):
        prune_once(_build("SwinForImageClassification"), PruningConfig(importance="l2", prune_num_heads=True))


def test_a_mac_budget_on_a_hf_vit():
    model, x = _build("ViTForImageClassification"), torch.randn(1, 3, 32, 32)
    full = count_macs(model, x)
    prune_once(model, PruningConfig(importance="l2", target_macs=0.5))
    assert 0.45 * full < count_macs(model, x) <= 0.5 * full


@pytest.mark.slow
def test_a_hf_vit_in_a_trainer_with_pruning_distillation_and_export(tmp_path):
    import lightning.pytorch as pl

    from pqv_lightning import KnowledgeDistillation, MobileExport, StructuredPruning

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = _build("ViTForImageClassification").train()

        def training_step(self, batch, batch_idx):  # the usual Hugging Face call: keyword input, .logits
            x, y = batch
            return F.cross_entropy(self.model(pixel_values=x).logits, y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(
            torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
        ),
        batch_size=4,
    )
    pruning = StructuredPruning(iterative_steps=2, accumulate_batches=2)
    distill = KnowledgeDistillation(alpha=0.5)
    export = MobileExport(
        output_dir=str(tmp_path / "out"), precisions=["fp32", "int8-dynamic"], formats=["onnx"], rank="none"
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(tmp_path),
        callbacks=[pruning, distill, export],
    )
    module = Module()
    trainer.fit(module, data)
    assert len(pruning.events) == 2 and module.model.vit.layers[0].attention.q_proj.out_features == 48
    # KD read the student's and the teacher's ModelOutput (without them: "saw no forward call of the network")
    assert torch.isfinite(trainer.callback_metrics["distill/kd_loss"])
    artifacts = export.manifest["artifacts"]
    assert [a["status"] for a in artifacts] == ["ok", "ok"]
    assert all(a["verification"]["cosine"] > 0.99 for a in artifacts)


def test_compress_a_hf_vit_with_its_logits_output(tmp_path):
    """compress() reads a Hugging Face classifier's logits for accuracy and for a gradient criterion."""
    from pqv_lightning.compress import CompressConfig, compress, load_compressed

    from conftest import quick_export_config

    pytest.importorskip("onnxruntime")
    model = _build("ViTForImageClassification", num_channels=1)
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(96, 1, 32, 32, generator=g), torch.randint(0, 10, (96,), generator=g)
    config = CompressConfig(
        pruning=PruningConfig(importance="taylor", pruning_ratio=0.5, reconstruct=True),
        export=quick_export_config(tmp_path, formats=["onnx"], precisions=["fp32"]),
    )
    report = compress(model, [(images, labels)], config, validation=[(images[:32], labels[:32])])
    assert report["stages"]["prune"]["params_after"] < 0.5 * report["stages"]["prune"]["params_before"]
    rebuilt = load_compressed(_build("ViTForImageClassification", seed=3, num_channels=1), tmp_path)
    with torch.no_grad():
        expected = (rebuilt(images[:32]).logits.argmax(-1) == labels[:32]).float().mean().item()
    assert report["stages"]["accuracy"]["pruned"] == pytest.approx(expected)
    assert [a["status"] for a in report["manifest"]["artifacts"]] == ["ok"]
