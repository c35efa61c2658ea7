"""STILLTAG_INFERENCE_PRECISION and friends: validated settings, and what "auto" resolves to."""

import pytest

from shared.config import COMPILE_MODES, PRECISIONS, Settings
from worker.model import resolve_precision


def test_defaults(tmp_path):
    s = Settings(data_dir=tmp_path)
    assert (s.inference_precision, s.inference_compile, s.torch_threads, s.gpu_decode) == ("auto", "off", 0, False)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_is_accepted(tmp_path, precision):
    assert Settings(data_dir=tmp_path, inference_precision=precision).inference_precision == precision


@pytest.mark.parametrize("bad", ["fp8", "FP32", "half", ""])
def test_unknown_precision_is_one_line_error(tmp_path, bad):
    with pytest.raises(ValueError, match=r"STILLTAG_INFERENCE_PRECISION must be one of auto, fp32, bf16, fp16"):
        Settings(data_dir=tmp_path, inference_precision=bad)


@pytest.mark.parametrize("mode", COMPILE_MODES)
def test_every_compile_mode_is_accepted(tmp_path, mode):
    assert Settings(data_dir=tmp_path, inference_compile=mode).inference_compile == mode


def test_unknown_compile_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"STILLTAG_INFERENCE_COMPILE must be one of off, default, reduce-overhead"):
        Settings(data_dir=tmp_path, inference_compile="max-autotune")


def test_torch_threads_cannot_be_negative(tmp_path):
    with pytest.raises(ValueError, match="torch_threads"):
        Settings(data_dir=tmp_path, torch_threads=-1)


def test_environment_names(monkeypatch, tmp_path):
    monkeypatch.setenv("STILLTAG_INFERENCE_PRECISION", "bf16")
    monkeypatch.setenv("STILLTAG_GPU_DECODE", "true")
    s = Settings(data_dir=tmp_path)
    assert (s.inference_precision, s.gpu_decode) == ("bf16", True)


def test_auto_on_a_cpu_is_fp32():
    # bf16 fails the parity a default must hold, also where the CPU computes it natively (README,
    # "Precision"): it is there for whoever sets it.
    assert resolve_precision("auto", "cpu") == "fp32"


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_explicit_precision_is_kept_on_any_device(precision):
    assert resolve_precision(precision, "cpu") == precision


def test_unknown_precision_in_code_is_refused():
    with pytest.raises(ValueError, match="inference precision must be auto, fp32, bf16, fp16"):
        resolve_precision("int8", "cpu")


def test_auto_on_a_gpu_is_fp16():
    # Decided by the parity figures (README, "Precision"); resolving needs no GPU.
    assert resolve_precision("auto", "cuda") == resolve_precision("auto", "cuda:1") == "fp16"
