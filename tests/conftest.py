from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest


def _pin_this_xdist_worker() -> None:
    """Under pytest-xdist (`-n 2` in CI), worker i computes on its own share of the cores, and so does every
    process it starts (affinity and the thread counts are inherited): two workers that each ran torch's and
    vLLM's OpenMP threads on every core would spin against each other. Must run before torch is imported."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cores = sorted(os.sched_getaffinity(0))
    if worker is None or count < 2 or len(cores) < count:
        return
    share = cores[int(worker.removeprefix("gw")) % count::count]
    os.sched_setaffinity(0, share)
    os.environ["OMP_NUM_THREADS"] = str(len(share))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, share))


_pin_this_xdist_worker()

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RECIPE = REPO / "recipes" / "smollm2-135m-int8.yaml"


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path_factory, monkeypatch):
    """Each test gets its own HF_HOME; nothing may reach the network."""
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def _module_folders_removed(request, tmp_path_factory):
    """The folders a module's fixtures made (runs and exports of the tiny model, up to ~1 GB a module) go when the
    module ends with no test failed, as tmp_path_retention_policy = "failed" does for each test's own folder.
    Autouse: set up first, so torn down after the module's other fixtures. No session-scoped fixture makes one."""
    root = tmp_path_factory.getbasetemp()
    before, failed_before = set(root.iterdir()), request.session.testsfailed
    yield
    if request.session.testsfailed != failed_before:
        return
    for path in set(root.iterdir()) - before:
        if path.is_symlink() or not path.is_dir():  # pytest's "<name>current" links
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe YAML (text) into tmp_path and return its path."""

    def write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


MINIMAL_RECIPE = """\
name: tiny
model:
  source: builtin:smollm2-135m-instruct
quantization:
  scheme: int8_per_channel
"""


@pytest.fixture
def minimal_recipe_text() -> str:
    return MINIMAL_RECIPE


def pytest_report_header(config):
    return f"QP_CACHE_DIR={os.environ.get('QP_CACHE_DIR', '~/.cache/quantize-pipeline')}"


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The embedded default model as an HF folder (converted once per machine)."""
    import subprocess

    from quantize_pipeline.recipe import models
    from quantize_pipeline.recipe.compute_dtype import auto_dtype

    done = subprocess.run([sys.executable, "-m", "quantize_pipeline.cli", "prepare-model"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    return models.builtin_model_dir("smollm2-135m-instruct", auto_dtype("auto"))  # what prepare-model made


def write_synthetic_models(root: Path, shapes, tokenizer_from: Path, **options) -> dict[str, Path]:
    """bench/synthetic_llama.py checkpoints of `shapes` under root/SHAPE, with the default model's tokenizer
    (options: write_checkpoint's, e.g. shard_bytes_max)."""
    sys.path.insert(0, str(REPO / "bench"))
    from synthetic_llama import write_checkpoint

    for shape in shapes:
        write_checkpoint(shape, root / shape, tokenizer_from=tokenizer_from, **options)
    return {shape: root / shape for shape in shapes}


@pytest.fixture(scope="session")
def ct_checkpoints(tiny_model_dir):
    """Real compressed-tensors checkpoints of the tiny model, built by compressed-tensors and cached
    under QP_CACHE_DIR: W8A8 (int8 per channel + dynamic per-token int8), W4A16 (pack-quantized int4,
    groups of 64), and a W8A8 that leaves layer 0's down_proj dense (for the ignore-list tests)."""
    from quantize_pipeline.recipe import models
    from tests.ct_checkpoints import cached

    root = models.cache_root()
    return {
        "W8A8": cached(tiny_model_dir, root, "W8A8"),
        "W4A16": cached(tiny_model_dir, root, "W4A16_G64"),
        "W8A8_dense_down0": cached(tiny_model_dir, root, "W8A8", ("lm_head", "re:model\\.layers\\.0\\.mlp\\.down_proj$")),
    }


# --- CI time, per module (issue #24): two runs' JSON files can be compared with bench/ci_time.py.
_TEST_SECONDS: dict[str, float] = {}
_CI_TIMES_UNWRITTEN: list[Path] = []  # said once, not at every test
_SESSION_STARTED = time.monotonic()  # the run's wall time: with two workers, less than the tests' sum


def pytest_runtest_logreport(report):
    """Add each phase's duration (setup, call, teardown) to its test's total; written as we go, so a run
    that is stopped still leaves its figures."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        return  # under xdist the controller receives every worker's reports and writes the file alone
    _TEST_SECONDS[report.nodeid] = _TEST_SECONDS.get(report.nodeid, 0.0) + report.duration
    if report.when == "teardown":
        _write_ci_times()


def _write_ci_times() -> None:
    """Best effort: a figure file that cannot be written (a full disk) must not stop the run it measures."""
    from quantize_pipeline.run.rundir import atomic_write_json

    modules: dict[str, float] = {}
    for nodeid, seconds in _TEST_SECONDS.items():
        module = nodeid.split("::", 1)[0]
        modules[module] = modules.get(module, 0.0) + seconds
    path = Path(os.environ.get("QP_CI_TIMES", str(REPO / ".pytest_cache" / "ci_times.json")))
    try:
        atomic_write_json(path, {
            "total_s": round(sum(_TEST_SECONDS.values()), 1), "wall_s": round(time.monotonic() - _SESSION_STARTED, 1),
            "modules": _slowest_first(modules),
            "tests": _slowest_first(_TEST_SECONDS),
        }, sort_keys=False)
    except OSError as error:
        if not _CI_TIMES_UNWRITTEN:
            print(f"\n{path}: CI times not written: {error}", file=sys.stderr)
        _CI_TIMES_UNWRITTEN.append(path)


def _slowest_first(seconds: dict[str, float]) -> dict[str, float]:
    return {name: round(value, 1) for name, value in sorted(seconds.items(), key=lambda item: -item[1])}


# --- Two workers (`make test`: pytest -n 2 --dist loadfile): each module runs whole on one worker, so the
# longest modules go first (by the CI times recorded in bench/data) and the run does not end on one of them.
RECORDED_CI_TIMES = REPO / "bench" / "data" / "ci_times_avx2_two_workers.json"


UNRECORDED_SLOW_MODULE_S = 200.0  # a slow module not yet in the recorded times: about one run of the tiny model


def pytest_collection_modifyitems(config, items):
    import json

    seconds = json.loads(RECORDED_CI_TIMES.read_text())["modules"] if RECORDED_CI_TIMES.is_file() else {}
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        if module not in seconds and item.get_closest_marker("slow"):
            seconds[module] = UNRECORDED_SLOW_MODULE_S
    items.sort(key=lambda item: -seconds.get(item.nodeid.split("::", 1)[0], 0.0))  # stable: file order otherwise
