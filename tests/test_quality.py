"""Fast checks of the quality-benchmark building blocks (benchmarks/quality): metrics, baselines, data, trainer."""

import numpy as np
import pytest
import torch


pytest.importorskip("sklearn")
pytest.importorskip("skimage")

from benchmarks.quality import metrics  # noqa: E402
from benchmarks.quality.baselines import pixel_cosine_scores, random_scores, ssim_scores  # noqa: E402


def test_detection_rate_on_a_toy_ranking():
    train_labels = np.array(["a", "a", "b", "b", "c"])
    rankings = np.array([[0, 1, 2, 4], [2, 0, 3, 1]])  # query 0 is "a", query 1 is "b"
    rates = metrics.detection_rate(train_labels[rankings[:, :2]], ["a", "b"])
    np.testing.assert_allclose(rates, [1.0, 0.5])
    table = metrics.detection_table(rankings, train_labels, ["a", "b"], ks=(2, 4), groups=["a", "b", "c"])
    assert table["k=2"]["per_group"] == {"a": 1.0, "b": 0.5}  # "c" has no query: not in the average
    assert table["k=2"]["mean"] == pytest.approx(0.75)
    assert table["k=4"]["mean"] == pytest.approx(0.5)


def test_detection_average_weights_every_group_once():
    train_labels = np.array(["a", "b"])
    rankings = np.array([[0], [0], [0], [0]])
    table = metrics.detection_table(rankings, train_labels, ["a", "a", "a", "b"], ks=(1,), groups=["a", "b"])
    assert table["k=1"]["mean"] == pytest.approx(0.5)  # macro: (1 + 0) / 2, not 3/4


def test_fidelity_metrics():
    rng = np.random.default_rng(0)
    exact = rng.normal(size=(3, 50))
    perfect = metrics.fidelity(exact * 2 + 1, exact, k=10)
    assert perfect == pytest.approx({"pearson": 1.0, "spearman": 1.0, "top10_overlap": 1.0})
    reversed_ = metrics.fidelity(-exact, exact, k=10)
    assert reversed_["pearson"] == pytest.approx(-1.0) and reversed_["top10_overlap"] == 0.0
    a = np.array([[5.0, 4, 3, 2, 1]])
    b = np.array([[5.0, 4, 1, 2, 3]])
    assert metrics.topk_overlap(a, b, k=2)[0] == 1.0
    assert metrics.topk_overlap(a, b, k=3)[0] == pytest.approx(2 / 3)


def test_lds_and_subset_predictions():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(2, 20))
    masks = (rng.random((12, 20)) < 0.5).astype(float)
    predicted = metrics.subset_predictions(scores, masks)
    assert predicted.shape == (2, 12)
    # a positive score lowers the predicted loss when the sample is included
    np.testing.assert_allclose(predicted, -(scores @ masks.T))
    np.testing.assert_allclose(metrics.lds(predicted, 3 * predicted + 1), 1.0)
    np.testing.assert_allclose(metrics.lds(predicted, -predicted), -1.0)


def test_pixel_and_ssim_baselines_rank_the_image_itself_first():
    generator = torch.Generator().manual_seed(0)
    train = torch.rand(6, 3, 16, 16, generator=generator)
    queries = train[[4, 1]]
    for scores in (pixel_cosine_scores(queries, train), ssim_scores(queries, train)):
        assert scores.shape == (2, 6)
        assert list(scores.argmax(1)) == [4, 1]
        assert scores[0, 4] == pytest.approx(1.0)
    # SSIM of a clearly different image is far below 1, also for 8x8 one-channel digits
    a, b = torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)
    a[..., 2:6, 3:5] = 1.0
    b[..., 1:3, 1:7] = 1.0
    assert ssim_scores(a, torch.cat([a, b]))[0, 1] < 0.5


def test_random_baseline_is_seeded():
    a, b = random_scores(3, 10, seed=4), random_scores(3, 10, seed=4)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (3, 10) and not np.array_equal(a, random_scores(3, 10, seed=5))


def test_stroke_thickness_grows_with_the_stroke_width():
    images = torch.zeros(3, 1, 16, 16)
    images[0, 0, 2:14, 7:8] = 1.0  # width 1
    images[1, 0, 2:14, 6:9] = 1.0  # width 3
    thickness = metrics.stroke_thickness(images)
    assert thickness[2] == 0.0  # no ink
    assert thickness[0] < thickness[1]
    assert 2.0 < thickness[1] < 4.0  # roughly the width, in pixels of the 16x16 image


def test_mixed_set_builder():
    from benchmarks.quality.data import NOISE_SUBSET, SUBSETS, build_mixed_set

    mixed = build_mixed_set(image_size=16, per_subset=10, seed=3)
    num_noise = len([s for s in mixed.subsets if s == NOISE_SUBSET])
    assert len(mixed) == 5 * 10 + num_noise and num_noise == 3  # 5% of the whole set
    assert mixed.images.shape == (len(mixed), 3, 16, 16) and mixed.images.dtype == np.uint8
    assert set(mixed.subsets) == {*SUBSETS, NOISE_SUBSET}
    assert len(mixed.rows("test")) == round(0.2 * len(mixed))
    assert np.array_equal(np.sort(np.concatenate([mixed.rows("train"), mixed.rows("test")])), mixed.ids)
    pixels = mixed.pixels(mixed.rows("test"))
    assert pixels.dtype == torch.float32 and 0.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0
    assert all(word in mixed.words() for word in ("digit", "face", "noise"))
    again = build_mixed_set(image_size=16, per_subset=10, seed=3)
    assert np.array_equal(mixed.images, again.images) and mixed.captions == again.captions


def test_digits_loader():
    from benchmarks.quality.data import digits

    images, labels = digits(8)
    assert images.shape == (1797, 1, 8, 8) and labels.shape == (1797,)
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0


def test_retraining_is_deterministic_and_weights_remove_samples():
    from benchmarks.quality.models import DDPMRecipe, train_ddpm

    recipe = DDPMRecipe(steps=3, batch_size=8, warmup_steps=1, block_out_channels=(8, 16))
    images = torch.rand(24, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    first = train_ddpm(images, recipe).unet.state_dict()
    second = train_ddpm(images, recipe).unet.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    weights = np.ones(24)
    weights[:4] = 0.0
    removed = train_ddpm(images, recipe, weights).unet.state_dict()
    assert any(not torch.equal(first[k], removed[k]) for k in first)
    # a removed sample's pixels do not matter: changing them gives bit-identical weights
    altered = images.clone()
    altered[:4] = 0.5
    same = train_ddpm(altered, recipe, weights).unet.state_dict()
    assert all(torch.equal(removed[k], same[k]) for k in removed)


def test_dense_gaussian_jl_preserves_inner_products():
    from benchmarks.quality.fidelity import GaussianJL

    generator = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(2, 3000, generator=generator), dim=1)
    jl = GaussianJL(3000, 1024, seed=1, block_rows=700)
    y = jl(x)
    assert y.shape == (2, 1024)
    torch.testing.assert_close(jl(x), y)  # seeded: identical
    assert float(y[0] @ y[1]) == pytest.approx(float(x[0] @ x[1]), abs=4 / 1024**0.5)
    assert float(y[0].norm()) == pytest.approx(1.0, abs=0.15)


def test_user_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    from benchmarks.quality.common import CACHE_ENV, user_cache_dir

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "root"))
    assert user_cache_dir("quality12") == tmp_path / "root" / "quality12"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir("quality12") == tmp_path / "xdg" / "diffusers_dmin" / "benchmarks" / "quality12"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_cache_dir("x") == tmp_path / "home" / ".cache" / "diffusers_dmin" / "benchmarks" / "x"
