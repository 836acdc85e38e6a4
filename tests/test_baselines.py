"""Image baselines: ImageFolder reading, features and cache, linear probe, transfer, CLI."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from conftest import requires_shared_data, write_images
from safetensors import safe_open

import dino_vos.eval.image.image_features as features_module
from dino_vos.backbones import Backbone, load_backbone, weights_fingerprint
from dino_vos.checkpoints import save_backbone_safetensors
from dino_vos.cli import main
from dino_vos.errors import InputError
from dino_vos.eval.image.image_features import FeatureSpec, cached_image_features, image_features
from dino_vos.eval.image.imagefolder import eval_transform, load_imagefolder, train_transform
from dino_vos.eval.image.linear import (
    LinearClassifier,
    LinearConfig,
    default_spec,
    evaluate_classifier,
    train_linear_probe,
)
from dino_vos.eval.image.transfer import (
    TransferConfig,
    TransferModel,
    layer_id,
    param_groups,
    train_transfer,
)

ARCH = {
    "model": "vit_tiny_patch16_224",
    "kwargs": {"patch_size": 8, "depth": 2, "img_size": 32, "embed_dim": 48, "num_heads": 3},
}
#: Class colours (RGB): the classes differ in colour, images add noise and a random stripe.
IMAGE_SIZE = 32





@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagefolder")
    write_images(root / "train", per_class=12, seed=0)
    write_images(root / "val", per_class=6, seed=1)
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    vit = timm.create_model(ARCH["model"], num_classes=0, **ARCH["kwargs"])
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_backbone_safetensors(vit.state_dict(), path, ARCH)
    return path


@pytest.fixture()
def backbone(weights: Path) -> Backbone:
    return load_backbone(None, weights=weights)


# --------------------------------------------------------------------------- data


def test_imagefolder_reads_classes_and_transforms(dataset: Path):
    train, val = load_imagefolder(dataset / "train", dataset / "val")
    assert train.classes == ("class0", "class1", "class2", "class3")
    assert len(train) == 48 and len(val) == 24
    assert train.labels.bincount().tolist() == [12] * 4
    image = torch.randint(0, 256, (3, 30, 50), dtype=torch.uint8)
    assert eval_transform(IMAGE_SIZE)(image).shape == (3, 32, 32)
    assert train_transform(IMAGE_SIZE)(image).shape == (3, 32, 32)
    # Resize 256 + center crop 224 by default, normalised with the ImageNet statistics.
    grey = torch.full((3, 300, 400), 124, dtype=torch.uint8)
    out = eval_transform()(grey)
    assert out.shape == (3, 224, 224)
    assert out[0].mean().item() == pytest.approx((124 / 255 - 0.485) / 0.229, abs=1e-3)


def test_val_may_hold_a_subset_of_the_train_classes(tmp_path: Path, dataset: Path):
    write_images(tmp_path / "val", per_class=2, seed=3)
    for extra in ("class0", "class1"):
        for file in (tmp_path / "val" / extra).iterdir():
            file.unlink()
        (tmp_path / "val" / extra).rmdir()
    train, val = load_imagefolder(dataset / "train", tmp_path / "val")
    assert val.classes == train.classes
    assert sorted(set(val.labels.tolist())) == [2, 3]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda root: (root / "train" / "class1" / "0.png").write_bytes(b"junk"), "0.png"),
        (lambda root: (root / "train" / "empty").mkdir(), "class 'empty'"),
        (
            lambda root: (root / "val" / "class0").rename(root / "val" / "extra"),
            "missing from train",
        ),
        (lambda root: (root / "val" / "class0" / "x.txt").write_text("ignored"), None),
    ],
)
def test_bad_imagefolders_give_clear_cli_errors(tmp_path: Path, weights: Path, mutate, message):
    write_images(tmp_path / "train", per_class=2, seed=0)
    write_images(tmp_path / "val", per_class=1, seed=1)
    mutate(tmp_path)
    result = run_cli(
        "knn", tmp_path / "train", tmp_path / "val", tmp_path / "out", weights, "--k", "1"
    )
    if message is None:  # files that are not images are ignored
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 2, result.output
    assert "Error:" in result.output and message in result.output
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1


def test_missing_or_classless_folders_are_errors(tmp_path: Path, dataset: Path, weights: Path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    for train, val, message in [
        (tmp_path / "nope", dataset / "val", "train folder not found"),
        (tmp_path / "flat", dataset / "val", "no class folders"),
        (dataset / "train", tmp_path / "flat", "no class folders"),
    ]:
        result = run_cli("knn", train, val, tmp_path / "out", weights)
        assert result.exit_code == 2 and message in result.output, result.output
    write_images(tmp_path / "one", per_class=1, seed=0)
    for extra in ("class1", "class2", "class3"):
        (tmp_path / "one" / extra / "0.png").unlink()
        (tmp_path / "one" / extra).rmdir()
    with pytest.raises(InputError, match="at least 2 class"):
        load_imagefolder(tmp_path / "one", dataset / "val")


# --------------------------------------------------------------------------- features


def test_image_features_follow_the_reference_layouts(backbone: Backbone):
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        tokens, grid = backbone.forward_tokens(images, layers=[0, 1])
        cls_last = image_features(backbone, images, FeatureSpec(1, False))
        both = image_features(backbone, images, FeatureSpec(2, False))
        pooled = image_features(backbone, images, FeatureSpec(1, True))
    assert torch.allclose(cls_last, tokens[1][:, 0])
    assert torch.allclose(both, torch.cat([tokens[0][:, 0], tokens[1][:, 0]], dim=1))
    # ViT-B layout of the reference: CLS and mean patch token interleaved feature by feature.
    assert pooled.shape == (2, 96)
    assert torch.allclose(pooled[:, 0::2], tokens[1][:, 0])
    assert torch.allclose(pooled[:, 1::2], tokens[1][:, 1:].mean(dim=1), atol=1e-6)
    assert default_spec(backbone) == FeatureSpec(2, False)  # ViT-S rule, capped by the depth
    with pytest.raises(InputError, match="has 2 blocks"):
        FeatureSpec(4).check(backbone)


def test_feature_cache_is_reused_and_keyed(tmp_path: Path, dataset: Path, backbone, monkeypatch):
    train, _ = load_imagefolder(dataset / "train", dataset / "val")
    spec = FeatureSpec()
    first = cached_image_features(backbone, train, "train", spec, IMAGE_SIZE, cache_dir=tmp_path)
    (cache_file,) = tmp_path.glob("train-*.safetensors")
    with safe_open(str(cache_file), framework="pt") as handle:
        meta = handle.metadata()
        assert handle.get_tensor("labels").tolist() == train.labels.tolist()
    assert meta["backbone"] == backbone.name and meta["weights_id"] == backbone.weights_id
    assert meta["weights_fingerprint"] == weights_fingerprint(backbone)
    assert (meta["image_size"], meta["resize_size"], meta["split"]) == ("32", "37", "train")

    def fail(*args, **kwargs):
        raise AssertionError("features were recomputed")

    monkeypatch.setattr(features_module, "extract_image_features", fail)
    again = cached_image_features(backbone, train, "train", spec, IMAGE_SIZE, cache_dir=tmp_path)
    assert torch.equal(first, again)
    monkeypatch.undo()
    bigger = cached_image_features(backbone, train, "train", spec, 40, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("train-*.safetensors"))) == 2
    assert bigger.shape == first.shape == (48, 48)


def test_random_init_weights_are_fingerprinted(backbone: Backbone):
    def random_tiny() -> Backbone:
        vit = timm.create_model(ARCH["model"], num_classes=0, **ARCH["kwargs"])
        return Backbone(vit, "tiny (random init)")

    one, two = random_tiny(), random_tiny()
    assert weights_fingerprint(one) != weights_fingerprint(two)
    two.load_state_dict(one.state_dict())
    assert weights_fingerprint(one) == weights_fingerprint(two)  # the content, not the source
    assert weights_fingerprint(backbone) != weights_fingerprint(one)


# --------------------------------------------------------------------------- training


def test_linear_probe_fast_and_reference_modes_learn(dataset: Path, backbone: Backbone):
    train, val = load_imagefolder(dataset / "train", dataset / "val")
    spec = default_spec(backbone)
    train_feats = cached_image_features(backbone, train, "train", spec, IMAGE_SIZE)
    val_feats = cached_image_features(backbone, val, "val", spec, IMAGE_SIZE)
    untrained = LinearClassifier(spec.dim(backbone), 4)
    assert evaluate_classifier(untrained, val_feats, val.labels)[0] <= 50.0
    fast = LinearConfig(epochs=10, batch_size=16, lr=2.0, fast=True)
    result = train_linear_probe(backbone, train, train_feats, val_feats, val.labels, spec, fast)
    assert len(result.history) == 10
    assert result.best_top1 >= 95.0
    assert result.best_state["linear.weight"].shape == (4, spec.dim(backbone))
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    reference = LinearConfig(epochs=6, batch_size=16, lr=2.0)
    result = train_linear_probe(
        backbone, train, None, val_feats, val.labels, spec, reference, IMAGE_SIZE
    )
    assert result.best_top1 >= 90.0
    assert result.history[-1]["lr"] < result.history[0]["lr"]  # cosine schedule


def test_transfer_finetune_and_linear_learn(dataset: Path, backbone: Backbone):
    train, val = load_imagefolder(dataset / "train", dataset / "val")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    config = TransferConfig(epochs=5, batch_size=16, lr=3e-3, backbone_lr_scale=0.3)
    finetuned, model = train_transfer(backbone, train, val, config, True, IMAGE_SIZE)
    linear, frozen = train_transfer(backbone, train, val, config, False, IMAGE_SIZE)
    assert finetuned.summary()["best_top1"] >= 90.0
    assert linear.summary()["best_top1"] >= 90.0
    # The caller's backbone is untouched; fine-tuning moves the copy, linear-only does not.
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    assert not torch.equal(
        model.backbone.vit.blocks[0].mlp.fc1.weight, before["vit.blocks.0.mlp.fc1.weight"]
    )
    assert torch.equal(
        frozen.backbone.vit.blocks[0].mlp.fc1.weight, before["vit.blocks.0.mlp.fc1.weight"]
    )


def test_layerwise_learning_rates(backbone: Backbone):
    model = TransferModel(backbone, 3)
    config = TransferConfig(lr=1.0, backbone_lr_scale=0.1, layer_decay=0.5, weight_decay=0.05)
    groups = param_groups(model, config)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["head.linear.weight"])] == (1.0, 0.05)
    assert lr_of[id(named["head.linear.bias"])] == (1.0, 0.0)
    assert lr_of[id(named["backbone.vit.norm.weight"])] == (pytest.approx(0.1), 0.0)
    assert lr_of[id(named["backbone.vit.blocks.1.attn.qkv.weight"])] == (pytest.approx(0.05), 0.05)
    assert lr_of[id(named["backbone.vit.blocks.0.attn.qkv.weight"])] == (pytest.approx(0.025), 0.05)
    assert lr_of[id(named["backbone.vit.pos_embed"])] == (pytest.approx(0.0125), 0.0)
    assert layer_id("vit.cls_token", 2) == 0 and layer_id("vit.norm.bias", 2) == 3


# --------------------------------------------------------------------------- CLI


def run_cli(command: str, train: Path, val: Path, out: Path, weights: Path, *extra: str):
    args = ["eval", command, "--train", str(train), "--val", str(val), "--out", str(out)]
    args += ["--weights", str(weights), "--image-size", str(IMAGE_SIZE), "--decode-workers", "0"]
    return CliRunner().invoke(main, [*args, "--device", "cpu", *extra])


def test_cli_knn_linear_transfer(tmp_path: Path, dataset: Path, weights: Path):
    train, val, out = dataset / "train", dataset / "val", tmp_path / "out"
    result = run_cli("knn", train, val, out, weights)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "knn.json").read_text())
    assert [(r["k"], r["k_used"]) for r in report["results"]] == [
        (10, 10), (20, 20), (100, 48), (200, 48),
    ]  # fmt: skip
    assert report["num_classes"] == 4 and report["num_train"] == 48
    assert report["results"][0]["top1"] >= 90.0  # colours separate even at random init
    assert "k-NN" in result.output and "k capped" in result.output
    assert len(list((out / "features").glob("*.safetensors"))) == 2

    result = run_cli("linear", train, val, out, weights, "--fast", "--epochs", "20", "--lr", "2")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "linear.json").read_text())
    assert report["mode"] == "fast" and len(report["history"]) == 20
    assert report["features"] == {"n_last_blocks": 2, "avgpool": False}
    assert report["best_top1"] >= 90.0
    with safe_open(str(out / "linear_classifier.safetensors"), framework="pt") as handle:
        assert set(handle.keys()) == {"linear.weight", "linear.bias"}
        assert json.loads(handle.metadata()["epoch"]) == report["best_epoch"]

    args = ["--epochs", "2", "--batch-size", "16", "--no-linear", "--save-model"]
    result = run_cli("transfer", train, val, out, weights, *args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "transfer.json").read_text())
    assert set(report) >= {"finetune", "config"} and "linear" not in report
    assert len(report["finetune"]["history"]) == 2
    assert load_backbone(None, weights=out / "finetuned_backbone.safetensors").depth == 2


def test_cli_rejects_bad_options(tmp_path: Path, dataset: Path, weights: Path):
    train, val, out = dataset / "train", dataset / "val", tmp_path / "out"
    result = run_cli("linear", train, val, out, weights, "--n-last-blocks", "5")
    assert result.exit_code == 2 and "--n-last-blocks 5" in result.output
    result = run_cli("knn", train, val, out, weights, "--resize-size", "16")
    assert result.exit_code == 2 and "--resize-size 16" in result.output


def test_cli_old_option_spellings_still_work_with_one_warning(
    tmp_path: Path, dataset: Path, weights: Path
):
    train, val, out, cache = dataset / "train", dataset / "val", tmp_path / "out", tmp_path / "c"
    result = run_cli("knn", train, val, out, weights, "--cache-dir", str(cache), "--workers", "0")
    assert result.exit_code == 0, result.output
    assert len(list(cache.glob("*.safetensors"))) == 2 and not (out / "features").exists()
    warnings = [line for line in result.output.splitlines() if "deprecated" in line]
    assert sorted(warnings) == [
        "Warning: --cache-dir is deprecated: use --cache",
        "Warning: --workers is deprecated: use --decode-workers",
    ]
    help_text = CliRunner().invoke(main, ["eval", "knn", "--help"]).output
    assert "--cache-dir" not in help_text and "--decode-workers" in help_text


# --------------------------------------------------------------------------- DAVIS tool


def _davis_tool():
    path = Path(__file__).resolve().parents[1] / "tools" / "make_davis_imagefolder.py"
    spec = importlib.util.spec_from_file_location("make_davis_imagefolder", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_davis_imagefolder_splits_each_sequence_in_halves(tmp_path: Path):
    frames = tmp_path / "davis" / "JPEGImages" / "480p"
    for name, count in (("seq-a", 5), ("seq-b", 4), ("single", 1)):
        (frames / name).mkdir(parents=True)
        for i in range(count):
            image = np.full((16, 24, 3), 40 * i, np.uint8)
            cv2.imwrite(str(frames / name / f"{i:05d}.jpg"), image)
    tool = _davis_tool()
    counts = tool.build(tmp_path / "davis", tmp_path / "folder")
    assert counts == {"classes": 2, "train": 4, "val": 5}
    train, val = load_imagefolder(tmp_path / "folder" / "train", tmp_path / "folder" / "val")
    assert train.classes == ("seq-a", "seq-b")
    names = {p.resolve() for p, _ in train.samples} & {p.resolve() for p, _ in val.samples}
    assert not names  # no frame in both splits
    assert all(p.is_symlink() for p, _ in train.samples)
    with pytest.raises(InputError, match="exists"):
        tool.build(tmp_path / "davis", tmp_path / "folder")


@requires_shared_data("davis2016-train-240p")
def test_make_davis_imagefolder_on_real_data(tmp_path: Path):
    tool = _davis_tool()
    counts = tool.build(tool.DEFAULT_SRC, tmp_path / "folder", stride=10)
    train, val = load_imagefolder(tmp_path / "folder" / "train", tmp_path / "folder" / "val")
    assert counts["classes"] == len(train.classes) == 30
    assert len(train) == counts["train"] and len(val) == counts["val"]
