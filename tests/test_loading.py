"""Issue 10: ``sae_ext.loading.load_sae`` checks a saved SAE directory before loading it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sae_lens import SAE
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainingSAE
from safetensors.torch import load_file, save_file

from sae_ext.loading import check_sae_dir, load_sae
from sae_ext.registry import PLUGIN_TRAINING_ARCHITECTURES, plugin_training_architectures
from sae_ext.testing import small_training_config

ARCHS = plugin_training_architectures()
D_IN, D_SAE = 32, 128
WEIGHTS, CFG = "sae_weights.safetensors", "cfg.json"


def _trained_like(arch: str, seed: int = 0) -> TrainingSAE:
    """A training SAE with random, non-degenerate weights (thresholds stay as initialised)."""
    torch.manual_seed(seed)
    sae = get_sae_training_class(arch)[0](small_training_config(arch, d_in=D_IN, d_sae=D_SAE))
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if "threshold" not in name:
                p.add_(torch.randn_like(p) * 0.1)
    return sae


def _saved(arch: str, path: Path) -> Path:
    _trained_like(arch).save_inference_model(path)
    return path


@pytest.fixture
def no_saelens_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the check lets a bad directory through to ``SAE.load_from_disk``."""

    def boom(*args, **kwargs):
        raise AssertionError("SAE.load_from_disk was reached: the directory was not checked first")

    monkeypatch.setattr(SAE, "load_from_disk", classmethod(boom))


# --------------------------------------------------------------------------- good directories


@pytest.mark.parametrize("arch", [*ARCHS, "batchtopk", "gated"])
def test_load_sae_matches_saelens_loader(arch: str, tmp_path: Path) -> None:
    path = _saved(arch, tmp_path / arch)
    ours, theirs = load_sae(path), SAE.load_from_disk(path)
    assert type(ours) is type(theirs) and not isinstance(ours, TrainingSAE)
    x = torch.randn(16, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_load_sae_passes_device_and_dtype(arch: str, tmp_path: Path) -> None:
    sae = load_sae(_saved(arch, tmp_path), device="cpu", dtype="float64")
    assert sae.dtype == torch.float64 and sae.cfg.dtype == "float64"
    assert sae.W_dec.dtype == torch.float64 and sae.W_dec.device.type == "cpu"
    assert torch.isfinite(sae(torch.randn(4, D_IN, dtype=torch.float64))).all()


@pytest.mark.parametrize("arch", ["sasa", "sign_aware_gated"])
def test_training_checkpoints_with_an_inference_name_load(arch: str, tmp_path: Path) -> None:
    """SASA / SA-GSAE training checkpoints share the inference name; log thresholds are renamed."""
    sae = _trained_like(arch)
    sae.save_model(tmp_path)
    loaded = load_sae(tmp_path)
    x = torch.randn(16, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sae(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- missing files


def test_missing_directory(tmp_path: Path, no_saelens_load: None) -> None:
    with pytest.raises(FileNotFoundError, match=rf"SAE directory {tmp_path / 'nope'} not found"):
        load_sae(tmp_path / "nope")


@pytest.mark.parametrize("missing", [CFG, WEIGHTS])
def test_missing_file_is_named(missing: str, tmp_path: Path, no_saelens_load: None) -> None:
    path = _saved("sasa", tmp_path / "s")
    (path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{path / missing} not found"):
        load_sae(path)


# --------------------------------------------------------------------------- bad cfg.json


def test_unreadable_cfg_json(tmp_path: Path, no_saelens_load: None) -> None:
    path = _saved("sasa", tmp_path / "s")
    (path / CFG).write_text('{"architecture": "sasa",')
    with pytest.raises(ValueError, match=rf"{path / CFG} is not valid JSON"):
        load_sae(path)
    (path / CFG).write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object; got list"):
        load_sae(path)


def _edit_cfg(path: Path, **changes) -> None:
    cfg = json.loads((path / CFG).read_text())
    cfg.update(changes)
    (path / CFG).write_text(json.dumps(cfg))


def test_unknown_architecture_lists_registered_and_says_import(
    tmp_path: Path, no_saelens_load: None
) -> None:
    path = _saved("sasa", tmp_path / "s")
    _edit_cfg(path, architecture="my_plugin_sae")
    with pytest.raises(ValueError) as info:
        load_sae(path)
    msg = str(info.value)
    assert "'my_plugin_sae', which is not registered" in msg
    for registered in ("jumprelu", "topk", "sasa", "scaffold_jumprelu", "sign_aware_gated"):
        assert f"'{registered}'" in msg
    assert "`import sae_ext`" in msg and "import the package that registers 'my_plugin_sae'" in msg


@pytest.mark.parametrize(
    "arch", ["scaffold_batchtopk", "scaffold_matryoshka_batchtopk", "batchtopk"]
)
def test_training_only_architecture_says_how_to_load_it(
    arch: str, tmp_path: Path, no_saelens_load: None
) -> None:
    _trained_like(arch).save_model(tmp_path)
    inference = PLUGIN_TRAINING_ARCHITECTURES.get(arch, "")
    with pytest.raises(
        ValueError,
        match=rf"training architecture '{arch}'.*TrainingSAE\.load_from_disk.*{inference}",
    ):
        load_sae(tmp_path)


def test_invalid_config_values_name_the_file(tmp_path: Path, no_saelens_load: None) -> None:
    path = _saved("sasa", tmp_path / "s")
    _edit_cfg(path, n_active_groups=999)
    with pytest.raises(
        ValueError,
        match=rf"{path / CFG} is not a valid 'sasa' config: n_active_groups must be an integer in \[1, 32\]; got 999",
    ):
        load_sae(path)


def test_bad_dtype_argument(tmp_path: Path, no_saelens_load: None) -> None:
    with pytest.raises(ValueError, match=r"dtype must be one of .*'bfloat16'.*got 'bf16'"):
        load_sae(_saved("sasa", tmp_path / "s"), dtype="bf16")


# --------------------------------------------------------------------------- bad weights


def _damage(path: Path, how: str) -> None:
    data = (path / WEIGHTS).read_bytes()
    damaged = {
        "truncated": data[: len(data) // 2],
        "header only": data[:64],
        "empty": b"",
        "garbage": bytes(range(256)) * 8,
    }[how]
    (path / WEIGHTS).write_bytes(damaged)


@pytest.mark.parametrize("how", ["truncated", "header only", "empty", "garbage"])
def test_corrupt_or_truncated_weights_name_the_file(
    how: str, tmp_path: Path, no_saelens_load: None
) -> None:
    path = _saved("sign_aware_gated", tmp_path / "s")
    _damage(path, how)
    with pytest.raises(
        ValueError,
        match=rf"{path / WEIGHTS} is not a readable safetensors file \(corrupt or truncated\?\)",
    ):
        load_sae(path)


def _edit_weights(path: Path, drop: tuple[str, ...] = (), add: dict | None = None) -> None:
    sd = load_file(path / WEIGHTS)
    for k in drop:
        del sd[k]
    sd.update(add or {})
    save_file(sd, path / WEIGHTS)


@pytest.mark.parametrize("arch", ARCHS)
def test_missing_and_unexpected_tensors_are_listed(
    arch: str, tmp_path: Path, no_saelens_load: None
) -> None:
    path = _saved(arch, tmp_path / "s")
    _edit_weights(
        path, drop=("b_dec", "W_enc"), add={"extra": torch.zeros(3), "W_gate": torch.zeros(2)}
    )
    with pytest.raises(
        ValueError,
        match=rf"{path / WEIGHTS} does not match its '.*' config: missing tensors \['W_enc', 'b_dec'\], "
        r"unexpected tensors \['W_gate', 'extra'\]",
    ):
        load_sae(path)


def test_only_missing_tensors(tmp_path: Path, no_saelens_load: None) -> None:
    path = _saved("scaffold_batchtopk", tmp_path / "s")
    _edit_weights(path, drop=("scaffold_U",))
    with pytest.raises(
        ValueError, match=r"missing tensors \['scaffold_U'\], unexpected tensors \[\]"
    ):
        load_sae(path)


def test_tensor_shapes_must_fit_the_config(tmp_path: Path, no_saelens_load: None) -> None:
    path = _saved("sasa", tmp_path / "s")
    _edit_weights(path, add={"W_dec": torch.zeros(D_SAE, 16)})
    with pytest.raises(
        ValueError,
        match=r"do not fit its config \(d_in=32, d_sae=128\): W_dec: \(128, 16\) \(expected \(128, 32\)\)",
    ):
        load_sae(path)


def test_check_sae_dir_returns_the_config_without_loading(
    tmp_path: Path, no_saelens_load: None
) -> None:
    cfg = check_sae_dir(_saved("scaffold_batchtopk", tmp_path / "s"))
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"]) == ("scaffold_jumprelu", D_IN, D_SAE)
