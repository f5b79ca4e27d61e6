import pytest
import torch

from larosa.calibrate import CalibrationConfig, Rotations, calibrate, pca
from larosa.errors import LarosaError

from tiny import tiny_model


def test_pca_diagonal_case_is_sorted_identity_permutation():
    h = torch.diag(torch.tensor([1.0, 5.0, 3.0], dtype=torch.float64))
    vals, q = pca(h, damping=0.0)
    assert torch.allclose(vals, torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64))
    assert torch.equal(q.abs(), torch.tensor([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=torch.float64))
    assert (q.max(dim=0).values > 0).all()  # canonical sign: largest entry positive


def test_pca_rotated_case_and_damping():
    theta = 0.3
    r = torch.tensor([[torch.cos(torch.tensor(theta)), -torch.sin(torch.tensor(theta))],
                      [torch.sin(torch.tensor(theta)), torch.cos(torch.tensor(theta))]], dtype=torch.float64)
    h = r @ torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64)) @ r.T
    vals, q = pca(h, damping=0.01)
    assert torch.allclose(vals, torch.tensor([4.0, 1.0], dtype=torch.float64) + 0.01 * 2.5)
    assert torch.allclose((q.T @ r).abs(), torch.eye(2, dtype=torch.float64), atol=1e-12)


def test_pca_of_data_diagonalises_gram():
    x = torch.randn(500, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
    vals, q = pca(x.T @ x, damping=0.0)
    g = q.T @ (x.T @ x) @ q
    assert torch.allclose(g, torch.diag(vals), atol=1e-8)
    assert (vals[:-1] >= vals[1:]).all()


def test_calibration_layer_by_layer_matches_full_model_statistics():
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (3, 16))
    rot = calibrate(model, ids, progress=False)
    # reference: collect layer-1 MLP norm outputs from a plain full forward
    seen = []
    h = model.model.layers[1].post_attention_layernorm.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(ids)
    h.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()
    _, q_ref = pca(x.T @ x)
    q = rot.get(1, "mlp_in", "gamma").double()
    assert torch.allclose(q.abs(), q_ref.abs(), atol=1e-4)
    assert rot.meta["tokens_per_layer"] == 48
    rot.check_orthogonal()


def test_no_calibration_on_test_split():
    with pytest.raises(LarosaError, match="leak"):
        CalibrationConfig(split="test")


def test_rotations_file_errors(tmp_path):
    model = tiny_model("llama")
    rot = calibrate(model, torch.randint(0, model.config.vocab_size, (2, 16)), progress=False)
    f = rot.save(tmp_path / "rot.safetensors")
    assert Rotations.load(f, model).q.keys() == rot.q.keys()
    other = tiny_model("llama", seed=1)
    with pytest.raises(LarosaError, match="different model"):
        Rotations.load(f, other)
    bigger = tiny_model("llama", hidden_size=64, intermediate_size=64)
    with pytest.raises(LarosaError, match="different model"):
        Rotations.load(f, bigger)
    data = f.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(LarosaError, match="truncated or corrupted"):
        Rotations.load(trunc)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(data[:-200] + bytes(200 * [0x7F]))
    with pytest.raises(LarosaError, match="corrupted"):
        Rotations.load(corrupt)
    with pytest.raises(LarosaError, match="does not exist"):
        Rotations.load(tmp_path / "none.safetensors")
