import pytest
import torch

from psp_model.nets.encoder import EncoderConfig, SSLAutoencoder
from psp_model.train.checkpoint import load_checkpoint, save_checkpoint
from monai.losses import ContrastiveLoss

from psp_model.train.ssl import SSLConfig, contrastive_loss, ssl_transforms, train_ssl


def blobs(n: int, size: int = 32, channels: int = 2, seed: int = 0) -> list[torch.Tensor]:
    """Smooth random volumes (sums of Gaussian blobs), z-normalised like the preprocessed MR."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, size)] * 3, indexing="ij"))
    volumes = []
    for _ in range(n):
        volume = torch.zeros(channels, size, size, size)
        for _ in range(4):
            centre = torch.rand(3, 1, 1, 1, generator=g) * 1.2 - 0.6
            width = 0.15 + 0.25 * torch.rand(1, generator=g)
            amplitude = torch.rand(channels, 1, 1, 1, generator=g) + 0.5
            volume += amplitude * torch.exp(-((grid - centre) ** 2).sum(0) / (2 * width**2))
        volumes.append((volume - volume.mean()) / volume.std())
    return volumes


def tiny_model(seed: int = 0) -> SSLAutoencoder:
    torch.manual_seed(seed)
    return SSLAutoencoder(EncoderConfig.tiny())


FAST = SSLConfig(epochs=3, batch_size=4, lr=1e-3, device="cpu", seed=7)


def test_loss_falls_on_smooth_volumes():
    history = train_ssl(tiny_model(), blobs(8), SSLConfig(epochs=8, batch_size=4, device="cpu"), progress=False)
    assert len(history) == 8
    assert history[-1] < 0.8 * history[0]


def test_same_seed_same_curve_and_weights():
    volumes = blobs(6)
    a, b = tiny_model(), tiny_model()
    assert train_ssl(a, volumes, FAST, progress=False) == train_ssl(b, volumes, FAST, progress=False)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_training_leaves_the_callers_volumes_alone():
    volumes = blobs(2)
    train_ssl(tiny_model(), volumes, SSLConfig(epochs=2, batch_size=2, device="cpu"), progress=False)
    for before, after in zip(blobs(2), volumes):
        assert torch.equal(before, after)


def test_other_seed_other_curve():
    volumes = blobs(6)
    other = SSLConfig(epochs=3, batch_size=4, lr=1e-3, device="cpu", seed=8)
    assert train_ssl(tiny_model(), volumes, FAST, progress=False) != train_ssl(tiny_model(), volumes, other,
                                                                                progress=False)


def test_resume_equals_uninterrupted_run(tmp_path):
    volumes = blobs(6)
    straight = tiny_model()
    expected = train_ssl(straight, volumes, SSLConfig(epochs=4, batch_size=4, lr=1e-3, device="cpu"), progress=False)

    path = tmp_path / "ssl.pt"
    interrupted = tiny_model()
    first = train_ssl(interrupted, volumes, SSLConfig(epochs=2, batch_size=4, lr=1e-3, device="cpu"),
                      checkpoint_path=path, progress=False)
    assert first == expected[:2]
    resumed = tiny_model(seed=123)  # weights come from the checkpoint, not from here
    history = train_ssl(resumed, volumes, SSLConfig(epochs=4, batch_size=4, lr=1e-3, device="cpu"),
                        checkpoint_path=path, resume=True, progress=False)
    assert history == expected
    for (name, x), y in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(x, y), name
    assert load_checkpoint(path)["epoch"] == 4


def test_resume_refuses_changed_settings(tmp_path):
    path = tmp_path / "ssl.pt"
    train_ssl(tiny_model(), blobs(4), SSLConfig(epochs=1, device="cpu"), checkpoint_path=path, progress=False)
    with pytest.raises(ValueError, match=r"SSL settings changed \(lr: checkpoint 0.0001 vs now 0.001\)"):
        train_ssl(tiny_model(), blobs(4), SSLConfig(epochs=2, lr=1e-3, device="cpu"), checkpoint_path=path,
                  resume=True, progress=False)


def test_resume_refuses_other_encoder(tmp_path):
    path = tmp_path / "ssl.pt"
    train_ssl(tiny_model(), blobs(2), SSLConfig(epochs=1, device="cpu"), checkpoint_path=path, progress=False)
    other = SSLAutoencoder(EncoderConfig(img_size=(32, 32, 32), patch_size=(8, 8, 8), hidden_size=32, mlp_dim=64,
                                         num_layers=1, num_heads=4))
    with pytest.raises(ValueError, match="was made for encoder"):
        train_ssl(other, blobs(2), SSLConfig(epochs=2, device="cpu"), checkpoint_path=path, resume=True,
                  progress=False)


def test_resume_needs_a_path():
    with pytest.raises(ValueError, match="resume=True needs a checkpoint_path"):
        train_ssl(tiny_model(), blobs(2), SSLConfig(device="cpu"), resume=True, progress=False)


def test_resume_from_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; train without resume"):
        train_ssl(tiny_model(), blobs(2), SSLConfig(device="cpu"), checkpoint_path=tmp_path / "no.pt", resume=True,
                  progress=False)


def test_gradient_accumulation_and_bf16_run_on_cpu():
    config = SSLConfig(epochs=2, batch_size=2, grad_accum_steps=2, precision="bf16", device="cpu")
    history = train_ssl(tiny_model(), blobs(5), config, progress=False)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(history)))


def test_rejects_wrong_volume_shape():
    with pytest.raises(ValueError, match=r"SSL volume 0 has shape \(1, 32, 32, 32\), expected \(2, 32, 32, 32\)"):
        train_ssl(tiny_model(), [torch.zeros(1, 32, 32, 32)], SSLConfig(device="cpu"), progress=False)


def test_accepts_a_dict_dataset():
    volumes = [{"image": volume.numpy()} for volume in blobs(2)]
    assert len(train_ssl(tiny_model(), volumes, SSLConfig(batch_size=2, device="cpu"), progress=False)) == 1


def test_rejects_no_volumes():
    with pytest.raises(ValueError, match="got no volumes"):
        train_ssl(tiny_model(), [], SSLConfig(device="cpu"), progress=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.0}, r"lr must be > 0, got 0.0"),
        ({"batch_size": 0}, r"batch_size must be an int >= 1, got 0"),
        ({"grad_accum_steps": 1.5}, r"grad_accum_steps must be an int >= 1, got 1.5"),
        ({"temperature": -1.0}, r"temperature must be > 0"),
        ({"precision": "fp8"}, r"precision must be one of auto, fp32, bf16, fp16, got 'fp8'"),
        ({"loss_mix": "mean"}, r"loss_mix must be 'tutorial' or 'sum'"),
        ({"seed": "1"}, r"seed must be an int"),
    ],
)
def test_config_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SSLConfig(**kwargs)


def test_views_differ_from_original_and_each_other():
    transforms = ssl_transforms((32, 32, 32))
    transforms.set_random_state(seed=0)
    volume = blobs(1)[0]
    out = transforms({"image": volume})
    assert torch.equal(torch.as_tensor(out["gt_image"]), volume)
    assert out["image"].shape == out["image_2"].shape == volume.shape
    assert not torch.equal(torch.as_tensor(out["image"]), volume)
    assert not torch.equal(torch.as_tensor(out["image"]), torch.as_tensor(out["image_2"]))


def test_checkpoint_write_is_atomic(tmp_path):
    path = tmp_path / "sub" / "c.pt"
    save_checkpoint({"a": torch.ones(2), "n": 3}, path)
    save_checkpoint({"a": torch.zeros(2), "n": 4}, path)
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]
    state = load_checkpoint(path)
    assert state["n"] == 4 and torch.equal(state["a"], torch.zeros(2))


def test_checkpoint_unreadable(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"(?s)bad.pt cannot be read .*delete it and train without resume"):
        load_checkpoint(path)


def test_checkpoint_must_hold_a_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match="holds a list, expected a dict"):
        load_checkpoint(path)


@pytest.mark.parametrize(("batch", "temperature"), [(1, 0.05), (2, 0.05), (4, 0.05), (3, 0.5)])
def test_contrastive_loss_matches_monai(batch, temperature):
    torch.manual_seed(batch)
    a = torch.randn(batch, 300, dtype=torch.float64, requires_grad=True)
    b = (a.detach() + 0.5 * torch.randn(batch, 300, dtype=torch.float64)).requires_grad_()
    ours = contrastive_loss(a, b, temperature=temperature)
    grads = torch.autograd.grad(ours, (a, b))
    theirs = ContrastiveLoss(temperature=temperature)(a, b)
    expected = torch.autograd.grad(theirs, (a, b))
    torch.testing.assert_close(ours, theirs)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_contrastive_loss_stays_finite_at_small_temperature():
    a, b = torch.randn(2, 50), torch.randn(2, 50)
    assert torch.isnan(ContrastiveLoss(temperature=0.005)(a, a))
    assert torch.isfinite(contrastive_loss(a, a, temperature=0.005))
    assert torch.isfinite(contrastive_loss(a, b, temperature=0.005))


def test_contrastive_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"two \(B, F\) tensors of one shape, got \(2, 5\) and \(2, 6\)"):
        contrastive_loss(torch.zeros(2, 5), torch.zeros(2, 6), temperature=0.05)
