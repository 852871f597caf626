"""``model_attr`` and ``example_input_shape`` on both callbacks that find the network themselves."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pqv_lightning import MobileExport, StructuredPruning
from pqv_lightning.errors import ConfigError

from conftest import make_trainer, random_loader, tiny_vit


class TwoNetworks(pl.LightningModule):
    """A student under ``net.backbone`` and a second, frozen ViT beside it (e.g. an EMA copy): the
    callbacks cannot guess which one to prune and export."""

    def __init__(self, **vit_kwargs) -> None:
        super().__init__()
        self.net = nn.Module()
        self.net.backbone = tiny_vit(0, **vit_kwargs)
        self.ema = tiny_vit(1, **vit_kwargs).requires_grad_(False)

    def forward(self, x):
        return self.net.backbone(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.net.parameters(), lr=1e-3)


def _pruning(**kw) -> StructuredPruning:
    return StructuredPruning(
        importance="l2", pruning_ratio=0.5, iterative_steps=1, accumulate_batches=1, interval="step", **kw
    )


def _export(tmp_path, **kw) -> MobileExport:
    return MobileExport(
        precisions=["fp32"],
        formats=["ptl"],
        output_dir=str(tmp_path / "export"),
        repeats=2,
        warmup=0,
        verify_batches=1,
        measure_memory=False,
        rank="in-process",
        **kw,
    )


@pytest.mark.parametrize("callback", ["pruning", "export"])
def test_two_candidate_networks_need_model_attr(tmp_path, callback):
    cb = _pruning() if callback == "pruning" else _export(tmp_path)
    trainer = make_trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=2)
    with pytest.raises(ConfigError, match=r"several prunable models found in TwoNetworks: \['net.backbone', 'ema'\]"):
        trainer.fit(TwoNetworks(), random_loader(32), random_loader(16))


def test_model_attr_points_both_callbacks_at_the_same_network(tmp_path):
    module = TwoNetworks()
    ema_before = {k: v.clone() for k, v in module.ema.state_dict().items()}
    pruning, export = _pruning(model_attr="net.backbone"), _export(tmp_path, model_attr="net.backbone")
    trainer = make_trainer(tmp_path, [pruning, export], max_epochs=1, limit_train_batches=4)
    trainer.fit(module, random_loader(64), random_loader(16))
    assert module.net.backbone.patch_embed.proj.out_channels == 32  # 64 -> 32: the backbone was pruned
    assert all(torch.equal(v, module.ema.state_dict()[k]) for k, v in ema_before.items())  # the other one not
    artifact = export.manifest["artifacts"][0]
    assert artifact["status"] == "ok" and artifact["verification"]["top1_agreement"] == 1.0
    # the exported file is the pruned backbone: its size is that of the pruned weights, not the unpruned ones
    pruned_bytes = sum(p.numel() * 4 for p in module.net.backbone.parameters())
    unpruned_bytes = sum(p.numel() * 4 for p in module.ema.parameters())
    assert artifact["size_bytes"] < (pruned_bytes + unpruned_bytes) / 2


def test_bad_model_attr_is_an_error_before_training(tmp_path):
    for cb in (_pruning(model_attr="net.missing"), _export(tmp_path, model_attr="net.missing")):
        module = TwoNetworks()
        trainer = make_trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=2)
        with pytest.raises(ConfigError, match="net.missing"):
            trainer.fit(module, random_loader(32), random_loader(16))
        assert module.net.backbone.patch_embed.proj.out_channels == 64  # nothing ran


def _unknown_size_module(**kw) -> TwoNetworks:
    module = TwoNetworks(dynamic_img_size=True, **kw)
    del module.ema
    module.net.backbone.patch_embed.img_size = None  # a network that does not know its input size
    return module


def test_a_network_without_an_input_size_asks_for_example_input_shape(tmp_path):
    trainer = make_trainer(tmp_path, [_pruning()], max_epochs=1, limit_train_batches=2)
    with pytest.raises(ConfigError, match=r"pass example_input_shape=\[C, H, W\]"):
        trainer.fit(_unknown_size_module(), random_loader(32), random_loader(16))


def _loader48(n: int) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(n, 1, 48, 48, generator=g), torch.randint(0, 10, (n,), generator=g)
    )
    return torch.utils.data.DataLoader(data, batch_size=16)


@pytest.mark.parametrize("with_val", [True, False])
def test_example_input_shape_is_what_both_callbacks_trace_and_export_with(tmp_path, with_val):
    module = _unknown_size_module()
    pruning = _pruning(example_input_shape=[1, 48, 48])
    export = _export(tmp_path, example_input_shape=[1, 48, 48])
    trainer = make_trainer(tmp_path, [pruning, export], max_epochs=1, limit_train_batches=4)
    trainer.fit(module, _loader48(64), _loader48(16) if with_val else None)
    assert module.net.backbone.patch_embed.proj.out_channels == 32
    # the pruner traced the unpruned network at 48x48 (145 tokens), not at its 32x32 default (65)
    from pqv_lightning.pruning import count_macs

    fresh = tiny_vit(0, dynamic_img_size=True)
    macs48, macs32 = count_macs(fresh, torch.randn(1, 1, 48, 48)), count_macs(fresh, torch.randn(1, 1, 32, 32))
    assert pruning.events[0].macs_before == macs48 != macs32
    assert export.manifest["input"]["shape"] == [1, 1, 48, 48]
    assert export.manifest["artifacts"][0]["status"] == "ok"
