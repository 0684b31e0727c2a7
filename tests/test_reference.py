"""The reference-model foundations: data generator, DiT config and loader, sampler, training
step, evaluator and metrics (issue 6). Everything here is small and runs on one thread."""
from __future__ import annotations

import math

import pytest
import torch

from ras_compile.reference import DEFAULT_GUIDANCE_SCALE, check, data, evaluator, metrics, model, sampling, train

TINY = dict(num_attention_heads=2, attention_head_dim=8, num_layers=1, sample_size=8)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- data -------------------------------------------------------------------------------

def test_make_batch_is_deterministic_and_seed_dependent():
    a, la = data.make_batch(3, 24)
    b, lb = data.make_batch(3, 24)
    c, lc = data.make_batch(4, 24)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)


def test_make_batch_shapes_range_and_classes():
    images, labels = data.make_batch(0, 80, size=32)
    assert images.shape == (80, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (80,) and labels.dtype == torch.int64
    assert images.min() >= -1 and images.max() <= 1
    assert torch.equal(torch.bincount(labels, minlength=data.NUM_CLASSES),
                       torch.full((data.NUM_CLASSES,), 80 // data.NUM_CLASSES))
    assert images.std() > 0.2  # not degenerate
    assert data.NUM_CLASSES == len(data.CLASS_NAMES) >= 6


def test_make_batch_does_not_touch_the_global_rng():
    state = torch.random.get_rng_state()
    data.make_batch(0, 4)
    assert torch.equal(state, torch.random.get_rng_state())


def test_make_batch_other_sizes():
    images, _ = data.make_batch(1, 3, size=16)
    assert images.shape == (3, 3, 16, 16)


def test_make_batch_renders_where_asked_from_the_same_cpu_draws():
    """A GPU run renders its batches on the GPU; CI has none, so the meta device stands in:
    it computes shapes only, and refuses (like CUDA) any op that mixes it with CPU tensors,
    so every tensor the renderer touches must be on the asked device. The draws stay on the
    CPU generator, so the CPU stream is unchanged by the device argument."""
    images, labels = data.make_batch(3, 10, size=16, device="meta")
    assert images.device.type == labels.device.type == "meta"
    assert images.shape == (10, 3, 16, 16) and labels.shape == (10,)
    cpu_images, cpu_labels = data.make_batch(3, 10, size=16, device="cpu")
    assert torch.equal(cpu_images, data.make_batch(3, 10, size=16)[0])
    assert torch.equal(cpu_labels, data.make_batch(3, 10, size=16)[1])


def test_objects_are_placed_inside_the_image_near_its_centre():
    """Every object fits in the image, its centre within CENTRE_JITTER of the middle and its
    radius in RADIUS_RANGE, and the draws cover those ranges."""
    radius, cx, cy = data._placements(torch.Generator().manual_seed(3), 4096, torch.device("cpu"))
    low, high = data.RADIUS_RANGE
    assert low <= radius.min() and radius.max() < high and radius.max() - radius.min() > 0.9 * (high - low)
    for c in (cx, cy):
        offset = (c - 0.5).abs()
        assert offset.max() <= data.CENTRE_JITTER and offset.max() > 0.9 * data.CENTRE_JITTER
        assert (c - radius).min() > 0 and (c + radius).max() < 1


def test_objects_are_upright():
    """The object frame is the image frame shifted and scaled, never rotated: a square's
    edges stay parallel to the image's."""
    x, y = data._grid(64, torch.device("cpu"))
    u, v = data._local_frame(x, y, torch.tensor([0.5]), torch.tensor([0.5]), torch.tensor([0.3]))
    square = data._shape_mask(data.CLASS_NAMES.index("square"), u, v)[0]
    rows, cols = square.any(dim=1), square.any(dim=0)
    assert torch.equal(square, rows[:, None] & cols[None, :])  # an axis-aligned rectangle


def test_training_seeds_stay_below_evaluation_seeds():
    assert data.training_seed(0, 0) != data.training_seed(0, 1) != data.training_seed(1, 0)
    assert data.training_seed(999_999, 999_999_999) < data.EVAL_SEED_BASE
    with pytest.raises(ValueError):
        data.training_seed(10 ** 6, 0)


# --- model ------------------------------------------------------------------------------

def test_reference_config_has_256_tokens_and_fits_the_size_budget():
    cfg = model.reference_config()
    assert (cfg["sample_size"] // cfg["patch_size"]) ** 2 >= 256
    assert cfg["in_channels"] == cfg["out_channels"] == 3
    assert cfg["num_embeds_ada_norm"] == data.NUM_CLASSES
    m = model.build_reference_model()
    assert model.parameter_count(m) * 4 <= 25 * 2 ** 20  # fp32 safetensors <= 25 MB


def test_dit_init_predicts_zero_and_diffusers_init_does_not():
    x = torch.randn(2, 3, 8, 8)
    kwargs = dict(hidden_states=x, timestep=torch.tensor([500.0, 10.0]), class_labels=torch.tensor([0, 1]),
                  return_dict=False)
    with torch.no_grad():
        assert model.build_reference_model(0, **TINY)(**kwargs)[0].abs().max() == 0
        assert model.build_reference_model(0, init="diffusers", **TINY)(**kwargs)[0].abs().max() > 0


def test_class_embedding_std_sets_the_initial_class_embeddings_only():
    base = model.build_reference_model(0, num_layers=2)
    loud = model.build_reference_model(0, class_embedding_std=1.0, num_layers=2)
    for a, b in zip(base.transformer_blocks, loud.transformer_blocks):
        table_a = a.norm1.emb.class_embedder.embedding_table.weight
        table_b = b.norm1.emb.class_embedder.embedding_table.weight
        assert 0.01 < table_a.std() < 0.03 and 0.9 < table_b.std() < 1.1
    differing = {n for (n, p), (_, q) in zip(base.named_parameters(), loud.named_parameters()) if not torch.equal(p, q)}
    assert differing and all(n.endswith("class_embedder.embedding_table.weight") for n in differing)
    with pytest.raises(ValueError, match="class_embedding_std"):
        model.build_reference_model(0, class_embedding_std=0.0, **TINY)
    assert train._parse(["--out", "x", "--class-embedding-std", "0.5"]).class_embedding_std == 0.5


def test_save_pretrained_round_trip(tmp_path):
    m = model.build_reference_model(1, init="diffusers", **TINY).eval()
    m.save_pretrained(tmp_path)
    loaded = model.load_reference_model(tmp_path)
    x = torch.randn(2, 3, 8, 8)
    kwargs = dict(timestep=torch.tensor([999.0, 1.0]), class_labels=torch.tensor([2, model.NULL_CLASS]),
                  return_dict=False)
    with torch.no_grad():
        assert torch.equal(m(hidden_states=x, **kwargs)[0], loaded(hidden_states=x, **kwargs)[0])
    assert not loaded.training


def test_loader_explains_how_to_train_missing_weights(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="python -m ras_compile.reference.train"):
        model.load_reference_model(tmp_path / "nothing")
    monkeypatch.setattr(model, "WEIGHTS_DIR", tmp_path / "no_weights")
    with pytest.raises(FileNotFoundError, match="ras_compile.reference.train"):
        model.load_reference_model()


#: Class accuracy the shipped reference DiT must reach on the fixed seeds below: the issue's bar
#: (docs/quality.md gives the shipped weights' figures on 32, 64 and 256 samples; a random model
#: scores ~0.125).
SHIPPED_ACCURACY_FLOOR = 0.90


def test_shipped_weights_load_and_their_dense_samples_draw_their_classes():
    """256 dense 28-step samples of the shipped reference DiT (32 per class, the check's seeds,
    the default guidance scale), judged by the shipped classifier, reach the issue's 90 % class
    accuracy (93 % today; fewer samples are too noisy for the bar: the first 32 alone score 88 %).
    About 2.5 minutes on 2 cores."""
    m = model.load_reference_model()
    assert m.config.sample_size == 32 and sum(f.stat().st_size for f in model.WEIGHTS_DIR.iterdir()) <= 25e6
    torch.set_num_threads(2)  # the one test here that samples the full model (the fixture restores the count)
    images, labels = check.dense_samples(m, 256, steps=28, guidance_scale=DEFAULT_GUIDANCE_SCALE)
    assert evaluator.accuracy(evaluator.load_classifier(), images, labels) >= SHIPPED_ACCURACY_FLOOR


# --- sampling ---------------------------------------------------------------------------

def test_sampler_shape_determinism_and_guidance():
    m = model.build_reference_model(2, init="diffusers", **TINY).eval()
    labels = torch.tensor([0, 3, model.NULL_CLASS])
    a = sampling.sample(m, labels, steps=2, seed=5)
    b = sampling.sample(m, labels, steps=2, seed=5)
    g = sampling.sample(m, labels, steps=2, seed=5, guidance_scale=3.0)
    assert a.shape == (3, 3, 8, 8) and a.dtype == torch.float32
    assert torch.equal(a, b) and torch.isfinite(g).all()
    assert not torch.allclose(a[:2], g[:2])
    # the null class is its own unconditional velocity, so guidance leaves it unchanged
    torch.testing.assert_close(a[2], g[2], rtol=1e-4, atol=1e-5)


def test_sampler_integrates_the_training_convention():
    """A 'model' returning the exact velocity noise - x0 of one target image makes the Euler
    sampler land on that image: the train / scheduler sign conventions agree."""
    target = data.make_batch(0, 1, size=8)[0]

    class Oracle(torch.nn.Module):
        config = type("C", (), {"in_channels": 3, "sample_size": 8, "num_embeds_ada_norm": data.NUM_CLASSES})

        def forward(self, hidden_states, timestep, class_labels, return_dict=False):
            sigma = (timestep / 1000.0).view(-1, 1, 1, 1)
            noise = (hidden_states - (1 - sigma) * target) / sigma  # invert x_t = (1-s) x0 + s noise
            return (noise - target,)

    out = sampling.sample(Oracle(), torch.tensor([0]), steps=4, seed=0)
    torch.testing.assert_close(out, target, rtol=1e-4, atol=1e-4)


# --- training ---------------------------------------------------------------------------

def test_noisy_pair_endpoints():
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    x_t, v = train.noisy_pair(x0, noise, torch.tensor([0.0, 1.0]))
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[1], noise[1])
    assert torch.equal(v, noise - x0)


def test_label_dropout_is_ours_and_seeded():
    m = model.build_reference_model(0, **TINY)
    assert train.disable_builtin_label_dropout(m) == TINY["num_layers"]
    labels = torch.arange(1000) % data.NUM_CLASSES
    dropped = train.drop_labels(labels, 0.1, torch.Generator().manual_seed(0))
    frac = (dropped == model.NULL_CLASS).float().mean()
    assert 0.05 < frac < 0.15
    assert torch.equal(dropped, train.drop_labels(labels, 0.1, torch.Generator().manual_seed(0)))


def test_training_steps_reduce_the_loss_on_a_fixed_batch():
    settings = train.TrainSettings(batch_size=8, label_dropout=0.0)
    m = model.build_reference_model(0, **TINY).train()
    train.disable_builtin_label_dropout(m)
    opt = train.make_optimizer(m, settings)
    x0, labels = data.make_batch(0, 8, size=8)

    def fixed_loss() -> float:
        with torch.no_grad():
            return float(train.flow_matching_loss(m, x0, labels, torch.Generator().manual_seed(0), settings))

    before = fixed_loss()
    for step in range(15):
        loss = train.train_step(m, opt, x0, labels, torch.Generator().manual_seed(step), 3e-3, settings)
        assert math.isfinite(loss)
    assert fixed_loss() < before


def test_train_writes_a_loadable_model_and_log(tmp_path):
    log = train.train(tmp_path, steps=2, settings=train.TrainSettings(batch_size=2), log_every=1,
                      model_overrides=TINY, gap_every=1)
    assert log["steps"] == 2 and len(log["curve"]) == 2
    assert [g["step"] for g in log["label_gaps"]] == [1, 2]
    assert set(log["label_gaps"][0]["label_gap"]) == {f"{s:g}" for s in check.GAP_SIGMAS}
    loaded = model.load_reference_model(tmp_path)
    assert loaded.config.sample_size == 8
    assert (tmp_path / "training_log.json").exists()
    again = train.train(tmp_path, steps=3, settings=train.TrainSettings(batch_size=2), log_every=1,
                        model_overrides=TINY, resume=True)
    assert again["steps"] == 3 and len(again["curve"]) == 3


def test_learning_rate_warms_up_holds_and_cools_down_to_zero():
    constant = train.TrainSettings(lr=1e-3, warmup_steps=10)
    assert train.learning_rate(0, constant) == pytest.approx(1e-4)
    assert train.learning_rate(9, constant) == train.learning_rate(5000, constant) == pytest.approx(1e-3)
    wsd = train.TrainSettings(lr=1e-3, warmup_steps=10, cooldown_from=100, cooldown_steps=50)
    assert [train.learning_rate(s, wsd) for s in (0, 99)] == [train.learning_rate(s, constant) for s in (0, 99)]
    assert train.learning_rate(100, wsd) == pytest.approx(1e-3)
    assert train.learning_rate(125, wsd) == pytest.approx(5e-4)
    assert train.learning_rate(149, wsd) == pytest.approx(2e-5) and train.learning_rate(150, wsd) == 0.0
    assert wsd.last_step == 150 and constant.last_step is None


def test_a_cooldown_ends_the_run_where_the_rate_reaches_zero(tmp_path):
    settings = train.TrainSettings(batch_size=2, cooldown_from=1, cooldown_steps=2)
    log = train.train(tmp_path, steps=10, settings=settings, log_every=1, model_overrides=TINY)
    assert log["steps"] == 3 and log["settings"]["cooldown_from"] == 1
    assert train.train(tmp_path / "b", settings=settings, log_every=1, model_overrides=TINY)["steps"] == 3


@pytest.mark.parametrize("kwargs", [dict(cooldown_from=5), dict(cooldown_steps=5), dict(cooldown_from=-1,
                                                                                        cooldown_steps=5)])
def test_settings_refuse_half_or_negative_cooldowns(kwargs):
    with pytest.raises(ValueError, match="cooldown"):
        train.TrainSettings(**kwargs)


def test_train_cli_refuses_a_half_cooldown_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match="--cooldown-from STEP --cooldown-steps N"):
        train.main(["--out", str(tmp_path), "--steps", "1", "--cooldown-from", "5"])


def test_ema_update_moves_towards_the_model():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = (a.weight - b.weight).abs().sum()
    train.ema_update(a, b, decay=0.9, step=10 ** 6)
    torch.testing.assert_close((a.weight - b.weight).abs().sum(), 0.9 * before)


# --- evaluator and metrics --------------------------------------------------------------

def test_psnr_ssim_identical_and_different():
    x = data.make_batch(0, 4)[0]
    assert torch.isinf(metrics.psnr(x, x)).all()
    torch.testing.assert_close(metrics.ssim(x, x), torch.ones(4))
    noisy = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    p, s = metrics.psnr(x, noisy), metrics.ssim(x, noisy)
    assert ((p > 10) & (p < 30)).all() and ((s > 0) & (s < 0.99)).all()
    assert (metrics.psnr(x, -x) < p).all()


def test_frechet_distance():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(500, 8, generator=gen)
    assert abs(metrics.frechet_distance(a, a)) < 1e-6
    b = torch.randn(500, 8, generator=gen)
    shifted = b + 2.0
    near, far = metrics.frechet_distance(a, b), metrics.frechet_distance(a, shifted)
    assert near < 1.0 and far == pytest.approx(near + 4 * 8, rel=0.1)


def test_classifier_shapes_save_load_and_quick_training(tmp_path):
    clf, log = evaluator.train_classifier(steps=3, batch_size=16, width=8, log_every=1)
    assert len(log["curve"]) == 3 and 0.0 <= log["eval_accuracy"] <= 1.0
    images, _ = data.make_batch(7, 5)
    assert evaluator.classify(clf, images).shape == (5,)
    assert evaluator.features(clf, images).shape == (5, 32)
    path = evaluator.save_classifier(clf, tmp_path / "c.safetensors")
    loaded = evaluator.load_classifier(path)
    torch.testing.assert_close(evaluator.features(loaded, images), evaluator.features(clf, images))
    with pytest.raises(FileNotFoundError, match="ras_compile.reference.evaluator"):
        evaluator.load_classifier(tmp_path / "missing.safetensors")


def test_shipped_classifier_recognises_the_generators_classes():
    """The evaluator ships trained (ras_compile/reference/weights/classifier.safetensors):
    on real images of seeds it never saw it must be a reliable judge of the classes."""
    clf = evaluator.load_classifier()
    images, labels = data.make_batch(data.EVAL_SEED_BASE + 777, 512)
    assert evaluator.accuracy(clf, images, labels) >= 0.95
    overshoot = images[:64] * 3  # a sampler's raw output may leave [-1, 1]: judged as it is shown, clamped
    assert torch.equal(evaluator.classify(clf, overshoot), evaluator.classify(clf, overshoot.clamp(-1, 1)))
    assert torch.equal(evaluator.features(clf, overshoot), evaluator.features(clf, overshoot.clamp(-1, 1)))


def test_batch_stream_gives_the_same_batches_with_and_without_loader_workers():
    plain = train.batch_stream(3, 5, 4, 16, workers=0)
    loaded = train.batch_stream(3, 5, 4, 16, workers=2)
    for step in range(5, 8):
        (xa, la), (xb, lb) = next(plain), next(loaded)
        want_x, want_l = data.make_batch(data.training_seed(3, step), 4, 16)
        assert torch.equal(xa, want_x) and torch.equal(la, want_l)
        assert torch.equal(xb, want_x) and torch.equal(lb, want_l)


def test_batch_stream_renders_on_the_training_device_without_workers_only():
    x, labels = next(train.batch_stream(3, 5, 4, 16, workers=0, device="meta"))
    assert x.device.type == labels.device.type == "meta"
    with pytest.raises(ValueError, match="workers=0"):
        next(train.batch_stream(3, 5, 4, 16, workers=2, device="meta"))


def test_train_with_model_options_compiled_and_refuses_to_resume_another_model(tmp_path):
    """--patch-size / --heads / --layers reach the model; --compile trains through
    torch.compile (the cheap aot_eager backend here) and saves the plain module's weights;
    resuming with another model is refused with the differing settings named."""
    from torch._dynamo.utils import counters

    pixels = dict(TINY, patch_size=1)
    counters.clear()
    log = train.train(tmp_path, steps=2, settings=train.TrainSettings(batch_size=2), log_every=1,
                      model_overrides=pixels, compile_backend="aot_eager")
    assert counters["stats"]["unique_graphs"] >= 1  # the training forward really went through Dynamo
    assert log["compile_backend"] == "aot_eager" and log["model_overrides"] == pixels
    assert all(math.isfinite(c["loss"]) for c in log["curve"])
    loaded = model.load_reference_model(tmp_path)
    assert loaded.config.patch_size == 1 and loaded.pos_embed.height == 8  # 8x8 pixels: 64 tokens
    assert not any(k.startswith("_orig_mod") for k in train.torch.load(
        tmp_path / "training_state.pt", weights_only=True)["model"])
    with pytest.raises(ValueError, match="patch_size: saved 1, now 2"):
        train.train(tmp_path, steps=3, settings=train.TrainSettings(batch_size=2), model_overrides=TINY,
                    resume=True)


def test_init_from_starts_from_saved_weights_and_records_where_they_came_from(tmp_path):
    """--init-from continues an earlier run (or the shipped weights) with a fresh optimiser:
    zero steps reproduce the saved weights exactly; the log names their hash and keeps their
    own training log; a resume keeps that record and adds up the wall time."""
    settings = train.TrainSettings(batch_size=2)
    first = train.train(tmp_path / "a", steps=2, settings=settings, log_every=1, model_overrides=TINY)
    same = train.train(tmp_path / "b", steps=0, settings=settings, model_overrides=TINY, seed=5,
                       init_from=tmp_path / "a")
    a, b = model.load_reference_model(tmp_path / "a"), model.load_reference_model(tmp_path / "b")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert same["init_from"]["log"]["steps"] == first["steps"] == 2
    assert len(same["init_from"]["weights_sha256"]) == 64
    fresh = model.build_reference_model(5, class_embedding_std=settings.class_embedding_std, **TINY)
    assert not torch.equal(fresh.proj_out_2.weight, b.proj_out_2.weight)  # not the seed's own initialisation

    go = train.train(tmp_path / "c", steps=2, settings=settings, log_every=1, model_overrides=TINY,
                     init_from=tmp_path / "a")
    assert go["steps"] == 2 and go["init_from"] == same["init_from"]
    more = train.train(tmp_path / "c", steps=3, settings=settings, log_every=1, model_overrides=TINY,
                       init_from=tmp_path / "a", resume=True)
    assert more["steps"] == 3 and more["init_from"] == go["init_from"]
    elapsed = [c["elapsed_s"] for c in more["curve"]]
    assert elapsed == sorted(elapsed) and more["wall_s"] >= go["wall_s"]


def test_init_from_refuses_another_model_and_a_folder_without_weights(tmp_path):
    settings = train.TrainSettings(batch_size=2)
    train.train(tmp_path / "a", steps=1, settings=settings, model_overrides=TINY)
    with pytest.raises(ValueError, match="num_layers: saved 1, now 2"):
        train.train(tmp_path / "b", steps=1, settings=settings, model_overrides=dict(TINY, num_layers=2),
                    init_from=tmp_path / "a")
    with pytest.raises(SystemExit, match="^error: no reference DiT weights in"):
        train.main(["--out", str(tmp_path / "c"), "--steps", "1", "--init-from", str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match="^error: .*holds another model"):
        train.main(["--out", str(tmp_path / "d"), "--steps", "1", "--init-from", str(tmp_path / "a")])


@pytest.mark.parametrize("args, message", [
    (["--heads", "0"], "--heads must be a positive integer"),
    (["--patch-size", "3"], "not a multiple of --patch-size 3"),
])
def test_train_cli_refuses_bad_model_options_in_one_line(tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        train.main(["--out", str(tmp_path), "--steps", "1", *args])


def test_label_gap_is_zero_for_a_model_that_ignores_its_label_and_not_when_it_does_not():
    m = model.build_reference_model(0, init="diffusers", **TINY).train()
    with torch.no_grad():  # every class (and the null class) gets the same embedding: labels are ignored
        for block in m.transformer_blocks:
            table = block.norm1.emb.class_embedder.embedding_table.weight
            table.copy_(table[:1].expand_as(table))
    blind = check.label_gap(m, n=16)
    assert m.training  # the mode is restored
    assert set(blind) == {f"{s:g}" for s in check.GAP_SIGMAS}
    assert all(v["gap"] == 0 and v["loss"] > 0 for v in blind.values())
    assert check.label_gap(m, n=16) == blind  # fixed seeds: checkpoints compare
    with torch.no_grad():
        for block in m.transformer_blocks:
            block.norm1.emb.class_embedder.embedding_table.weight.normal_(std=3.0)
    assert any(v["gap"] != 0 for v in check.label_gap(m, n=16).values())


def test_check_reports_accuracy_and_frechet_distance_of_dense_samples(tmp_path):
    m = model.build_reference_model(0, init="diffusers", **TINY).eval()  # eval: no label dropout
    clf = evaluator.build_classifier(0, width=8)
    result = check.check_model(m, clf, n=8, steps=2)
    assert result["samples"] == 8 and result["steps"] == 2
    assert 0.0 <= result["accuracy"] <= 1.0 and math.isfinite(result["frechet_distance"])
    per_class = [tuple(map(int, v.split("/"))) for v in result["right_per_class"].values()]
    assert list(result["right_per_class"]) == list(data.CLASS_NAMES) and all(n == 1 for _, n in per_class)
    assert sum(r for r, _ in per_class) / 8 == pytest.approx(result["accuracy"])
    images, labels = check.dense_samples(m, 8, steps=2)
    assert images.shape == (8, 3, 8, 8) and torch.equal(labels, torch.arange(8) % data.NUM_CLASSES)
    again, _ = check.dense_samples(m, 8, steps=2)
    assert torch.equal(images, again)


def test_demo_and_check_sample_at_the_named_default_guidance_scale():
    """One named default (ras_compile.reference.DEFAULT_GUIDANCE_SCALE) for every command that
    samples the reference DiT, so their figures are comparable (bench_quality: its own tests)."""
    import inspect

    from ras_compile.cli import build_parser

    assert DEFAULT_GUIDANCE_SCALE != 1.0  # the shipped model draws its classes with guidance, not without
    assert build_parser().parse_args(["demo"]).guidance == DEFAULT_GUIDANCE_SCALE
    for fn in (check.dense_samples, check.check_model):
        assert inspect.signature(fn).parameters["guidance_scale"].default == DEFAULT_GUIDANCE_SCALE
