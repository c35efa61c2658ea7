"""STILLTAG_INFERENCE_PRECISION and friends: validated settings, and what "auto" resolves to."""

import pytest

from shared.config import COMPILE_MODES, PRECISIONS, Settings
from worker.model import cpu_has_native_bf16, resolve_precision


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


WITHIN = {"max_diff": 0.0079, "p99_diff": 0.0041, "flip_share": 0.0, "decisions": 729, "flips": 0}
OUTSIDE = {"max_diff": 0.0155, "p99_diff": 0.0107, "flip_share": 0.0017, "decisions": 576, "flips": 1}


def test_auto_on_a_native_bf16_cpu_serves_bf16_only_a_model_whose_record_holds():
    assert resolve_precision("auto", "cpu", parity_records={"bf16": WITHIN}, native_bf16=True)[0] == "bf16"
    precision, why = resolve_precision("auto", "cpu", parity_records={"bf16": OUTSIDE, "fp16": WITHIN}, native_bf16=True)
    assert precision == "fp32" and "bf16 parity is outside the limits (max 0.0155, p99 0.0107, 1 of 576 decisions flipped)" in why
    precision, why = resolve_precision("auto", "cpu", native_bf16=True)  # registered by hand: never measured
    assert precision == "fp32" and "no bf16 parity record" in why


@pytest.mark.parametrize("record", [
    {**WITHIN, "p99_diff": 0.0051},  # each limit on its own
    {**WITHIN, "max_diff": 0.021},
    {**WITHIN, "flip_share": 0.0011},
    {"max_diff": 0.001},  # incomplete
    {**WITHIN, "p99_diff": "n/a"},  # unreadable
    "within",
])
def test_a_record_outside_any_limit_or_unreadable_keeps_fp32(record):
    assert resolve_precision("auto", "cpu", parity_records={"bf16": record}, native_bf16=True)[0] == "fp32"


def test_auto_on_a_cpu_without_native_bf16_is_fp32_whatever_the_record():
    # oneDNN emulates bf16 there, slower than fp32.
    precision, why = resolve_precision("auto", "cpu", parity_records={"bf16": WITHIN, "fp16": WITHIN}, native_bf16=False)
    assert (precision, why) == ("fp32", "auto: this CPU has no native bf16")


@pytest.mark.parametrize(("flags", "native"), [
    ("fpu avx2 avx512f avx512_bf16 avx512_vnni", True),  # AMD Zen 4, Intel Cooper Lake
    ("fpu avx2 avx512f amx_bf16 amx_tile", True),  # Intel Sapphire Rapids
    ("fpu avx2 fma avx512f avx512bw", False),  # AVX-512 without bf16: emulated
    ("fpu avx2 fma", False),
])
def test_native_bf16_is_read_from_the_cpu_flags(flags, native):
    cpuinfo = f"processor\t: 0\nmodel name\t: some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n"
    assert cpu_has_native_bf16(cpuinfo) is native


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_explicit_precision_is_kept_on_any_device(precision):
    assert resolve_precision(precision, "cpu", parity_records={"bf16": OUTSIDE}) == (precision, "set")
    assert resolve_precision(precision, "cuda")[0] == precision


def test_unknown_precision_in_code_is_refused():
    with pytest.raises(ValueError, match="inference precision must be auto, fp32, bf16, fp16"):
        resolve_precision("int8", "cpu")


def test_auto_on_a_gpu_serves_fp16_only_a_model_whose_fp16_record_holds():
    # Resolving needs no GPU: the device is a name, and bf16 support is given.
    assert resolve_precision("auto", "cuda", parity_records={"fp16": WITHIN, "bf16": WITHIN}, native_bf16=True)[0] == "fp16"
    precision, why = resolve_precision("auto", "cuda:1", parity_records={"fp16": WITHIN}, native_bf16=False)
    assert precision == "fp16" and why.startswith("auto: a GPU, and the model's fp16 parity is within the limits")


def test_auto_on_a_gpu_falls_back_to_bf16_then_fp32():
    assert resolve_precision("auto", "cuda", parity_records={"fp16": OUTSIDE, "bf16": WITHIN}, native_bf16=True)[0] == "bf16"
    # A GPU without bf16 (before Ampere) never gets it, whatever its record.
    precision, why = resolve_precision("auto", "cuda", parity_records={"fp16": OUTSIDE, "bf16": WITHIN}, native_bf16=False)
    assert precision == "fp32" and why == ("auto: the model's fp16 parity is outside the limits "
                                           "(max 0.0155, p99 0.0107, 1 of 576 decisions flipped)")
    precision, why = resolve_precision("auto", "cuda", parity_records={"fp16": OUTSIDE, "bf16": OUTSIDE}, native_bf16=True)
    assert precision == "fp32" and "fp16 and bf16 parity is outside the limits (fp16: max 0.0155" in why


def test_auto_on_a_gpu_serves_a_model_never_measured_in_fp32():
    precision, why = resolve_precision("auto", "cuda", native_bf16=True)  # registered by hand
    assert precision == "fp32" and "no fp16 or bf16 parity record" in why and "stilltag models measure" in why
