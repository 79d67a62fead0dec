"""`make gpu-wheels` (issue #28): the wheels the GPU machines lent here lack, for their Python 3.12, into .whl/.

Those machines have no network; packages travel as wheels in the working tree (64 MiB a call). Their image
already holds torch, transformers, accelerate, safetensors, numpy, pandas, pyarrow, scikit-learn and more
(the device library's KINDS.md, read 2026-11-17: `ALREADY_THERE` below); this downloads what this project
needs beyond that, each at the version installed here (the tested stack), following every wheel's own
requirements, builds this project's wheel, and copies the default model's tokenizer files (tokenizer/, for
bench/gpu_check.py --model synthetic:135m). It prints each size and fails above the limit.

    python bench/gpu_wheels.py [--dest .whl]
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import click
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
LIMIT_BYTES = 64 * 2**20
# The GPU image's packages (device library, KINDS.md); the engine (vLLM) is not among them and not carried:
# the GPU check evaluates with the transformers engine.
ALREADY_THERE = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi charset-normalizer chex
click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax
e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio
h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax
opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy
seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers
treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp
""".split())
# What the GPU check runs: the pipeline (pyproject's dependencies) with the transformers engine.
ROOTS = ("pydantic", "amd-quark", "lm_eval", "compressed-tensors", "gguf", "datasets")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
          "platform_machine": "x86_64", "os_name": "posix", "extra": ""}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(wheel: Path) -> list[str]:
    """The wheel's own requirements that apply on the GPU machine (no extras)."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    needed = []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            requirement = Requirement(line.removeprefix("Requires-Dist:").strip())
            if requirement.marker is None or requirement.marker.evaluate(TARGET):
                needed.append(requirement.name)
    return needed


def download(name: str, dest: Path) -> Path:
    version = importlib.metadata.version(name)  # the version tested here
    before = set(dest.glob("*.whl"))
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               "3.12", "--implementation", "cp", "-d", str(dest), f"{name}=={version}"]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    if subprocess.run(command).returncode != 0:
        # An sdist only (rouge-score): built here, which is fine for the GPU's Python when it is pure Python.
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), f"{name}=={version}"],
                       check=True)
        built = set(dest.glob("*.whl")) - before
        if not all(path.name.endswith("-py3-none-any.whl") for path in built):
            raise SystemExit(f"error: {name}=={version}: no wheel for Python 3.12 and not pure Python")
    new = set(dest.glob("*.whl")) - before
    return next(iter(new)) if new else next(path for path in dest.glob("*.whl")
                                            if normalized(path.name.split("-")[0]) == normalized(name))


def copy_tokenizer(folder: Path) -> Path:
    """The default model's tokenizer files (3.5 MiB): the GPU machines lack the default model (its GGUF is 98 MB,
    over a call's 64 MiB), so the GPU check writes a synthetic 135M-shaped checkpoint there and uses these."""
    from synthetic_llama import copy_tokenizer as copy_tokenizer_files

    from quantize_pipeline.recipe.schema import load_recipe
    from quantize_pipeline.run.runner import resolve_base_model

    model_dir = resolve_base_model(load_recipe(REPO / "recipes" / "smollm2-135m-int8.yaml"), folder.parent / "model.log",
                                   say=click.echo)
    folder.mkdir(parents=True, exist_ok=True)
    copy_tokenizer_files(Path(model_dir), folder)
    return folder


@click.command()
@click.option("--dest", type=click.Path(path_type=Path), default=REPO / ".whl", show_default=True)
def main(dest: Path) -> None:
    dest.mkdir(exist_ok=True)
    queue, seen = list(ROOTS), set()
    while queue:
        name = normalized(queue.pop(0))
        if name in seen or name in ALREADY_THERE:
            continue
        seen.add(name)
        wheel = download(name, dest)
        queue += requirements(wheel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest),
                    str(REPO)], check=True)
    tokenizer = copy_tokenizer(dest / "tokenizer")
    total = sum(path.stat().st_size for path in tokenizer.iterdir())
    click.echo(f"{total / 2**20:7.2f} MiB  tokenizer/ (the default model's, for gpu_check.py --model synthetic:135m)")
    for wheel in sorted(dest.glob("*.whl")):
        total += wheel.stat().st_size
        click.echo(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    click.echo(f"{total / 2**20:7.2f} MiB in {len(list(dest.glob('*.whl')))} wheels and the tokenizer "
               f"(limit {LIMIT_BYTES / 2**20:.0f} MiB a call)")
    if total > LIMIT_BYTES:
        raise SystemExit(f"error: {dest}: {total / 2**20:.1f} MiB of wheels, over the {LIMIT_BYTES / 2**20:.0f} MiB a call carries")


if __name__ == "__main__":
    main()
