"""`intentlora push`: what goes up from a run and from an export, and the dry run. The upload itself is not run offline."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub
import pytest
from typer.testing import CliRunner

from intentlora.cli import app
from intentlora.hub import HubError, card_text, push, select_files
from intentlora.rundir import IncompleteRunError

runner = CliRunner()


def names(files: list[Path], folder: Path) -> set[str]:
    return {f.relative_to(folder).as_posix() for f in files}


def test_run_uploads_adapter_labels_config_metrics_card_and_calibration(tiny_run, tmp_path):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    adapter = {f"adapter/{f.name}" for f in (run / "adapter").iterdir()}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= adapter
    expected = adapter | {"labels.json", "config.yaml", "metrics.json"} | ({"README.md"} if (run / "README.md").is_file() else set())
    assert names(select_files(run, merged=False), run) == expected  # no report, plots, errors.jsonl (test texts) or checkpoints
    (run / "calibration.json").write_text('{"threshold": 0.5, "fallback_label": "other"}', encoding="utf-8")
    assert names(select_files(run, merged=False), run) == expected | {"calibration.json"}


def test_export_uploads_the_whole_model_folder(tiny_export):
    selected = names(select_files(tiny_export, merged=True), tiny_export)
    assert selected == {f.name for f in tiny_export.iterdir() if f.is_file()}
    assert {"config.json", "model.safetensors", "labels.json", "tokenizer.json"} <= selected


def test_merged_flag_must_match_the_folder(tiny_run, tiny_export):
    with pytest.raises(HubError, match="intentlora export .* OUT_DIR"):
        select_files(tiny_run, merged=True)
    with pytest.raises(HubError, match="add --merged"):
        select_files(tiny_export, merged=False)


def test_unfinished_run_is_refused(tiny_run, tmp_path):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    (run / "metrics.json").unlink()
    with pytest.raises(IncompleteRunError, match="incomplete run"):
        select_files(run, merged=False)


def test_dry_run_lists_files_with_sizes_and_prints_the_card_for_the_repo(tiny_run, tmp_path):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    (run / "README.md").unlink(missing_ok=True)  # a run trained before cards: the card is rendered, not written
    before = sorted(p.name for p in run.iterdir())
    result = runner.invoke(app, ["push", str(run), "--repo-id", "someone/bank-intents", "--dry-run"])
    assert result.exit_code == 0, result.output
    size = (run / "adapter" / "adapter_model.safetensors").stat().st_size
    assert f"{size:,}  adapter/adapter_model.safetensors" in result.output
    assert "labels.json" in result.output and "README.md" in result.output
    assert "library_name: peft" in result.output
    assert 'snapshot_download("someone/bank-intents")' in result.output and "REPO_ID" not in result.output
    assert sorted(p.name for p in run.iterdir()) == before  # a dry run writes nothing


def test_dry_run_of_an_export_uses_its_card(tiny_export, tmp_path):
    export = Path(shutil.copytree(tiny_export, tmp_path / "export"))
    (export / "README.md").write_text("---\nlibrary_name: transformers\n---\n\n# card\nvllm serve REPO_ID --runner pooling\n", encoding="utf-8")
    assert "vllm serve me/bank --runner pooling" in card_text(export, merged=True, repo_id="me/bank")
    result = runner.invoke(app, ["push", str(export), "--repo-id", "me/bank", "--merged", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "model.safetensors" in result.output and "vllm serve me/bank" in result.output
    (export / "README.md").unlink()
    result = runner.invoke(app, ["push", str(export), "--repo-id", "me/bank", "--merged", "--dry-run"])
    assert result.exit_code == 1 and "no model card" in result.output


def test_wrong_folder_kind_is_a_clear_cli_error(tiny_run):
    result = runner.invoke(app, ["push", str(tiny_run), "--repo-id", "me/bank", "--merged", "--dry-run"])
    assert result.exit_code == 1 and "export" in result.output


def test_push_without_a_token_stops_before_the_network(tiny_run, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(HubError, match="HF_TOKEN"):
        push(tiny_run, "me/bank")


def test_push_sends_one_commit_with_the_selected_files_and_the_named_card(tiny_run, tmp_path, monkeypatch):
    """The calls push makes, recorded instead of sent: repo, branch, one commit of exactly the selected files."""
    calls = []

    class RecordingApi:
        def __init__(self, token):
            calls.append(("token", token))

        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create_repo", repo_id, private, exist_ok))
            return huggingface_hub.RepoUrl(f"https://huggingface.co/someone/{repo_id}")  # a bare name gets the user's namespace

        def create_branch(self, repo_id, branch, exist_ok):
            calls.append(("create_branch", repo_id, branch))

        def create_commit(self, repo_id, operations, commit_message, revision):
            calls.append(("create_commit", repo_id, revision, operations))
            return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/abc", commit_message=commit_message,
                                              commit_description="", oid="abc")

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    url = push(run, "bank", private=True, revision="v1", token="hf_test")
    assert url == "https://huggingface.co/someone/bank/commit/abc"
    assert calls[:3] == [("token", "hf_test"), ("create_repo", "bank", True, True), ("create_branch", "someone/bank", "v1")]
    (_, repo_id, revision, operations), = calls[3:]
    assert (repo_id, revision) == ("someone/bank", "v1")
    uploaded = {op.path_in_repo: op for op in operations}
    assert set(uploaded) == names(select_files(run, merged=False), run) | {"README.md"}
    card = uploaded["README.md"].path_or_fileobj
    card = card.read() if hasattr(card, "read") else card
    assert b'snapshot_download("someone/bank")' in card and b"REPO_ID" not in card
