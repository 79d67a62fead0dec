"""Publishing to the Hub: the stock huggingface_hub client against a local Hub protocol double.

No network and no models: tests/hub_server.py answers on 127.0.0.1. One opt-in
test talks to the real Hub when HF_TOKEN and QP_HUB_E2E_REPO are set.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from quantize_pipeline.errors import InputError
from quantize_pipeline.publish.card import build_model_card
from quantize_pipeline.publish.hub import check_token, dry_run_listing, parse_hub_target, publish_folder, resolve_token
from quantize_pipeline.run.rundir import sha256_file
from tests.hub_server import running_hub

WRITE_TOKEN = "hf_doubleWRITEtoken0123456789abcdefghij"
READ_TOKEN = "hf_doubleREADtoken0123456789abcdefghijk"
WRONG_TOKEN = "hf_doubleWRONGtoken0123456789abcdefghi"
TOKENS = {
    WRITE_TOKEN: {"user": "qp-tester", "orgs": ["qp-org"], "role": "write"},
    READ_TOKEN: {"user": "qp-reader", "orgs": ["qp-org"], "role": "read"},
}
REPO = "qp-org/tiny-int8"

TASK_RESULTS = [
    {"task_type": "text-generation", "dataset_type": "allenai/ai2_arc", "dataset_name": "ARC-Easy",
     "metric_type": "acc", "base": 0.6123, "quantized": 0.6011},
    {"task_type": "text-generation", "dataset_type": "Rowan/hellaswag", "dataset_name": "HellaSwag",
     "metric_type": "acc_norm", "base": 0.4250, "quantized": 0.4199},
]  # fmt: skip
GATE_MD = "## Gate\n\n| rule | verdict |\n|---|---|\n| arc_easy.acc drop <= 0.02 | pass |\n"


def _hub_client_online(monkeypatch, tmp_path: Path) -> None:
    """huggingface_hub reads its settings once at import: patch the module constants, not only the env."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))  # no real login leaks in
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fresh Hub protocol double; the client is online, without Xet, and pointed at it."""
    from huggingface_hub import constants

    _hub_client_online(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # else uploads go through Xet (hf-xet is installed)
    with running_hub(TOKENS) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


def _card() -> str:
    return build_model_card(
        model_name="tiny-int8",
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        scheme="int8_per_channel",
        scheme_description="int8 weights, one scale per output channel",
        weight_dtype_tag="int8",
        excluded=["lm_head"],
        kv_cache="fp8",
        task_results=TASK_RESULTS,
        gate_markdown=GATE_MD,
        serve_as=REPO,
    )


@pytest.fixture
def model_folder(tmp_path) -> Path:
    """A small export: binary weights (LFS), config, card, and a nested file."""
    folder = tmp_path / "export"
    (folder / "tokenizer").mkdir(parents=True)
    weights = b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(4096))  # 128 KiB, binary
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + weights)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "quark"}}))
    (folder / "README.md").write_text(_card(), encoding="utf-8")
    (folder / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0"}')
    return folder


def _publish(hub, folder: Path, **kwargs) -> dict:
    kwargs.setdefault("token", WRITE_TOKEN)
    kwargs.setdefault("commit_message", "Publish tiny-int8")
    return publish_folder(folder, REPO, endpoint=hub.endpoint, **kwargs)


def _download(hub, tmp_path: Path, token: str | None = WRITE_TOKEN, revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    cache = tmp_path / f"cache-{len(list(tmp_path.glob('cache-*')))}"  # a fresh cache: bytes come from the server
    return Path(snapshot_download(REPO, endpoint=hub.endpoint, token=token, revision=revision, cache_dir=cache))


def _writes(hub) -> list[tuple[str, str]]:
    return [(m, p) for m, p in hub.state.requests if m in ("POST", "PUT") and "whoami" not in p]


def _commit_count(hub, revision: str = "main") -> int:
    from huggingface_hub import HfApi

    return len(HfApi(endpoint=hub.endpoint, token=WRITE_TOKEN).list_repo_commits(REPO, revision=revision))


# -- publish round trip ---------------------------------------------------------


def test_publish_then_snapshot_download_is_byte_identical(hub, model_folder, tmp_path):
    result = _publish(hub, model_folder)

    assert result["already_published"] is False
    assert result["repo_id"] == REPO and result["revision"] == "main"
    assert result["url"] == f"{hub.endpoint}/{REPO}"
    assert len(result["commit"]) == 40
    downloaded = _download(hub, tmp_path)
    for item in dry_run_listing(model_folder):
        assert sha256_file(downloaded / item["path"]) == item["sha256"], item["path"]
    # The weights went through the LFS batch API and the upload URL; the text files inline.
    head = hub.state.repos[REPO].commits[result["commit"]]
    assert head.tree["model.safetensors"].lfs and not head.tree["config.json"].lfs
    assert any(m == "PUT" and p.startswith("/_lfs/upload/") for m, p in hub.state.requests)
    assert _commit_count(hub) == 2  # the repo's initial commit, then ours


def test_publish_is_one_atomic_commit(hub, model_folder):
    _publish(hub, model_folder)

    commits = [p for m, p in hub.state.requests if m == "POST" and "/commit/" in p]
    assert len(commits) == 1


def test_second_publish_of_same_content_commits_nothing(hub, model_folder):
    first = _publish(hub, model_folder)
    writes_before = len(_writes(hub))

    second = _publish(hub, model_folder)

    assert second["already_published"] is True
    assert second["commit"] == first["commit"]
    assert _commit_count(hub) == 2
    new_writes = _writes(hub)[writes_before:]
    assert all("/repos/create" in p for _, p in new_writes), new_writes  # only the exist_ok create_repo


def test_changed_file_makes_a_new_commit_and_reuploads_only_it(hub, model_folder, tmp_path):
    first = _publish(hub, model_folder)
    puts_before = sum(m == "PUT" for m, _ in hub.state.requests)
    (model_folder / "config.json").write_text('{"model_type": "llama", "changed": true}')

    second = _publish(hub, model_folder, commit_message="Republish")

    assert second["already_published"] is False and second["commit"] != first["commit"]
    assert hub.state.repos[REPO].commits[second["commit"]].parent == first["commit"]
    assert _commit_count(hub) == 3
    assert sum(m == "PUT" for m, _ in hub.state.requests) == puts_before  # the weights were not sent again
    downloaded = _download(hub, tmp_path)
    assert (downloaded / "config.json").read_text() == '{"model_type": "llama", "changed": true}'


def test_publish_to_a_branch_leaves_main_alone(hub, model_folder, tmp_path):
    result = _publish(hub, model_folder, revision="int8-v1")

    assert result["revision"] == "int8-v1" and result["url"].endswith("/tree/int8-v1")
    assert _commit_count(hub, "main") == 1
    assert set(hub.state.repos[REPO].commits[hub.state.repos[REPO].branches["main"]].tree) == {".gitattributes"}
    downloaded = _download(hub, tmp_path, revision="int8-v1")
    assert sha256_file(downloaded / "model.safetensors") == sha256_file(model_folder / "model.safetensors")


# -- tokens -------------------------------------------------------------------------


def test_wrong_token_publishes_nothing_and_never_shows_the_token(hub, model_folder):
    with pytest.raises(InputError) as caught:
        _publish(hub, model_folder, token=WRONG_TOKEN)

    message = caught.value.one_line()
    assert WRONG_TOKEN not in message and WRONG_TOKEN not in repr(caught.value)
    assert f"HF token rejected by {hub.endpoint} (401)" in message and "hf auth login" in message
    assert caught.value.exit_code == 2
    assert hub.state.repos == {} and hub.state.blobs == {}
    assert _writes(hub) == []


def test_missing_token_is_one_line_input_error(hub, model_folder):
    assert resolve_token(env={}) is None  # no HF_TOKEN and no saved login (HF_TOKEN_PATH points nowhere)

    with pytest.raises(InputError, match="no HF token") as caught:
        _publish(hub, model_folder, token=None)
    assert "\n" not in str(caught.value)
    assert hub.state.requests == []


def test_read_only_token_is_refused_before_upload(hub, model_folder):
    with pytest.raises(InputError, match="read-only"):
        _publish(hub, model_folder, token=READ_TOKEN)
    assert hub.state.repos == {}


def test_namespace_without_rights_is_an_input_error(hub, model_folder):
    with pytest.raises(InputError, match=r"refused \(403") as caught:
        publish_folder(model_folder, "someone-else/model", token=WRITE_TOKEN, endpoint=hub.endpoint, commit_message="x")
    assert WRITE_TOKEN not in caught.value.one_line()
    assert hub.state.repos == {}


def test_check_token_returns_the_user(hub):
    assert check_token(WRITE_TOKEN, hub.endpoint) == "qp-tester"


def test_resolve_token_prefers_env_then_login_cache(hub, tmp_path):
    from huggingface_hub import constants

    assert resolve_token(env={"HF_TOKEN": " hf_from_env "}) == "hf_from_env"
    Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
    Path(constants.HF_TOKEN_PATH).write_text("hf_from_login_cache")
    assert resolve_token(env={}) == "hf_from_login_cache"


def test_offline_mode_is_refused_with_a_hint(hub, model_folder, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match="HF_HUB_OFFLINE"):
        _publish(hub, model_folder)


# -- visibility -----------------------------------------------------------------------


def test_private_flag_round_trips_and_hides_the_repo(hub, model_folder, tmp_path):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    result = _publish(hub, model_folder)

    assert result["private"] is True
    assert HfApi(endpoint=hub.endpoint, token=WRITE_TOKEN).model_info(REPO).private is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.endpoint, token=False).model_info(REPO)


def test_public_repo_downloads_without_a_token(hub, model_folder, tmp_path):
    from huggingface_hub import HfApi

    result = _publish(hub, model_folder, private=False)

    assert result["private"] is False
    assert HfApi(endpoint=hub.endpoint, token=False).model_info(REPO).private is False
    downloaded = _download(hub, tmp_path, token=False)
    assert sha256_file(downloaded / "README.md") == sha256_file(model_folder / "README.md")


# -- the double itself ------------------------------------------------------------------


def _raw_commit(hub, lines: list[dict]) -> int:
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    request = urllib.request.Request(
        f"{hub.endpoint}/api/models/{REPO}/commit/main",
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {WRITE_TOKEN}", "Content-Type": "application/x-ndjson"},
    )
    try:
        with urllib.request.urlopen(request) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_double_commit_is_all_or_nothing(hub, model_folder):
    first = _publish(hub, model_folder)
    blobs_before = dict(hub.state.blobs)

    status = _raw_commit(
        hub,
        [
            {"key": "header", "value": {"summary": "half", "description": ""}},
            {"key": "file", "value": {"path": "new.txt", "content": base64.b64encode(b"new").decode(), "encoding": "base64"}},
            {"key": "lfsFile", "value": {"path": "ghost.safetensors", "algo": "sha256", "oid": "0" * 64, "size": 3}},
        ],
    )

    assert status == 422
    assert hub.state.repos[REPO].branches["main"] == first["commit"]
    assert hub.state.blobs == blobs_before  # the inline file of the refused commit was not stored


def test_double_rejects_writes_without_a_valid_token(hub):
    for headers in ({}, {"Authorization": f"Bearer {WRONG_TOKEN}"}):
        request = urllib.request.Request(
            f"{hub.endpoint}/api/repos/create", data=b'{"name": "x", "organization": "qp-org"}', method="POST", headers=headers
        )
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request)
        assert caught.value.code == 401
    assert hub.state.repos == {}


# -- helpers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [("hf://qp-org/tiny-int8", "qp-org/tiny-int8"), ("hf://user/name.v2/", "user/name.v2"), ("out/tiny", None), ("/abs/path", None)],
)
def test_parse_hub_target(target, expected):
    assert parse_hub_target(target) == expected


@pytest.mark.parametrize("target", ["hf://", "hf://only-name", "hf://a/b/c", "hf://bad name/x"])
def test_parse_hub_target_rejects_malformed_hub_targets(target):
    with pytest.raises(InputError, match="hf://ORG/NAME"):
        parse_hub_target(target)


def test_dry_run_listing_lists_sizes_and_hashes(model_folder):
    (model_folder / ".hidden").write_text("not published")

    listing = dry_run_listing(model_folder)

    assert [item["path"] for item in listing] == ["README.md", "config.json", "model.safetensors", "tokenizer/tokenizer.json"]
    for item in listing:
        path = model_folder / item["path"]
        assert item["size"] == path.stat().st_size
        assert item["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


# -- model card -------------------------------------------------------------------------


def test_card_round_trips_through_model_card(tmp_path):
    from huggingface_hub import ModelCard

    text = _card()
    (tmp_path / "README.md").write_text(text, encoding="utf-8")

    for card in (ModelCard(text), ModelCard.load(tmp_path / "README.md")):
        data = card.data
        assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert data.base_model_relation == "quantized" and data.library_name == "vllm"
        assert data.tags == ["quark", "int8", "int8_per_channel", "vllm"]
        figures = {(r.dataset_name, r.metric_type): r.metric_value for r in data.eval_results}
        assert figures == {("ARC-Easy", "acc"): 0.6011, ("HellaSwag", "acc_norm"): 0.4199}
        assert {r.dataset_type for r in data.eval_results} == {"allenai/ai2_arc", "Rowan/hellaswag"}
    assert "| 0.6123 | 0.6011 | -0.0112 |" in text  # the base figure, beside the quantized one
    assert GATE_MD.rstrip("\n") in text
    assert f'LLM(model="{REPO}", quantization="quark", kv_cache_dtype="fp8")' in text


def test_card_without_kv_cache_has_no_kv_cache_dtype():
    text = build_model_card(
        model_name="tiny", base_model="b/m", scheme="s", scheme_description="d", weight_dtype_tag="int8",
        excluded=[], kv_cache=None, task_results=TASK_RESULTS[:1], gate_markdown="gate",
    )  # fmt: skip
    assert 'LLM(model="tiny", quantization="quark")' in text and "kv_cache_dtype" not in text


# -- the real Hub (opt-in) --------------------------------------------------------------------


@pytest.mark.skipif(
    not (os.environ.get("HF_TOKEN") and os.environ.get("QP_HUB_E2E_REPO")),
    reason="publishes to the real Hub: set HF_TOKEN and QP_HUB_E2E_REPO=ORG/NAME (a private scratch repo) to run",
)
def test_publish_to_the_real_hub(model_folder, tmp_path, monkeypatch):
    from huggingface_hub import constants, snapshot_download

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets HF_HUB_OFFLINE=1 for every test
    repo_id = os.environ["QP_HUB_E2E_REPO"]
    token = resolve_token()
    (model_folder / "run.txt").write_text(os.urandom(8).hex())  # new content, so a new commit

    first = publish_folder(model_folder, repo_id, token=token, private=True, commit_message="qp e2e test")
    again = publish_folder(model_folder, repo_id, token=token, private=True, commit_message="qp e2e test")

    assert first["already_published"] is False and again == {**first, "already_published": True}
    downloaded = Path(snapshot_download(repo_id, token=token, revision=first["commit"], cache_dir=tmp_path / "cache"))
    for item in dry_run_listing(model_folder):
        assert sha256_file(downloaded / item["path"]) == item["sha256"], item["path"]
