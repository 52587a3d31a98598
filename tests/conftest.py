from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

# Tiny models run fastest on one thread, and two threads collapse when another process takes a core.
# Set before torch is imported; subprocesses (CLI, pty tests) inherit it. Tests of threading set it themselves.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

sys.path.insert(0, str(Path(__file__).parent))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session", params=["lite", "v2", "plain"])
def hf_checkpoint(request, tmp_path_factory) -> Path:
    """A tiny random HF checkpoint in each of the three configurations."""
    from tiny_models import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp(f"hf_{request.param}"), request.param, seed=1)


@pytest.fixture(scope="session")
def hf_lite(tmp_path_factory) -> Path:
    """The V2-Lite-like tiny checkpoint alone."""
    from tiny_models import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("hf_lite_only"), "lite", seed=2)


@pytest.fixture(scope="session")
def tiny_q4_gguf(tmp_path_factory, hf_lite) -> Path:
    """The V2-Lite-like tiny model converted with the default recipe: routed experts 4-bit (Q4_K / Q4_0)."""
    from lite.convert import convert

    out = tmp_path_factory.mktemp("tiny_q4") / "tiny-q4.gguf"
    convert(hf_lite, out)
    return out


@pytest.fixture(scope="session", params=["v3", "moonlight", "kimi"])
def hf_v3(request, tmp_path_factory) -> Path:
    """A tiny random DeepseekV3ForCausalLM checkpoint: V3/R1-like, Moonlight-like, Kimi-K2-like."""
    from tiny_models import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp(f"hf_{request.param}"), request.param, seed=3)


@pytest.fixture(scope="session")
def hf_fp8(tmp_path_factory) -> tuple[Path, Path]:
    """(fp8 checkpoint, its exactly dequantized float32 twin): the V3-like config with e4m3 weights and 128x128
    block scales, as DeepSeek-V3/R1 are released."""
    from tiny_models import make_checkpoint, make_fp8_checkpoint

    src = make_checkpoint(tmp_path_factory.mktemp("hf_v3_src"), "v3", seed=4)
    fp8, ref = tmp_path_factory.mktemp("hf_fp8"), tmp_path_factory.mktemp("hf_fp8_ref")
    make_fp8_checkpoint(src, fp8, ref)
    return fp8, ref


@pytest.fixture(scope="session")
def native_kernels():
    """`quant.native`, built (or found in TORCH_EXTENSIONS_DIR's cache) when the first test that needs it runs, not
    while the tests are collected: a failed build skips those tests with the compiler's reason, and
    test_native_kernels.py's test_extension_builds fails on it wherever a C++ compiler is present."""
    from quant import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.build_error()}")
    return native


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"../shared is absent ({SHARED}); it holds the DeepSeek vocabulary and corpus")
    return SHARED


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def lite(capsys, monkeypatch):
    """`lite ARGS...` in this process (like a Click runner): cli.main.main with captured output."""
    from cli.main import main

    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("NO_COLOR", "1")

    def call(*args: str, stdin: str | bytes | None = None, check: bool = True) -> Result:
        capsys.readouterr()
        if isinstance(stdin, bytes):  # a byte stream underneath, as a pipe gives
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
        elif stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = main(list(args))
        out, err = capsys.readouterr()
        if check:
            assert code == 0, err
        return Result(code, out, err)

    return call
