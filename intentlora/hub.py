"""`intentlora push`: a run's adapter, or an `export` folder, to the Hugging Face Hub.

A run goes up in its own layout (adapter/, labels.json, config.yaml,
metrics.json, calibration.json, README.md), so `IntentClassifier` loads a
download of it as it loads the run, and PEFT loads it with
subfolder="adapter". An export goes up as the plain transformers folder it
is. Everything is one commit; the model card's REPO_ID becomes the
repository's id.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from intentlora.card import CARD_FILE, REPO_PLACEHOLDER, render_model_card
from intentlora.rundir import (
    ADAPTER_DIR, CALIBRATION_FILE, CONFIG_FILE, LABELS_FILE, METRICS_FILE, check_run_dir, is_run_dir, read_config, read_metrics,
)

# What of a run the Hub gets: what loading it needs, its config and scores; not the
# report, the plots or errors.jsonl (test texts), nor checkpoints.
RUN_FILES = (CARD_FILE, LABELS_FILE, CALIBRATION_FILE, CONFIG_FILE, METRICS_FILE)


class HubError(ValueError):
    """The folder cannot be pushed as asked, or there is no token to push with."""


def select_files(folder: Path, merged: bool) -> list[Path]:
    """The files `push` uploads from `folder`: a finished run's adapter files, or (`merged`) an export's model files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"{folder}: not a folder (give a run directory or a folder written by `export`)")
    if is_run_dir(folder):
        if merged:
            raise HubError(
                f"{folder} is a run folder (a LoRA adapter), not a merged model: merge it first with "
                f"`intentlora export {folder} OUT_DIR`, then `intentlora push OUT_DIR --merged`"
            )
        check_run_dir(folder)
        adapter = sorted(f for f in (folder / ADAPTER_DIR).rglob("*") if f.is_file() and not _hidden(f, folder))
        return adapter + [folder / name for name in RUN_FILES if (folder / name).is_file()]
    if not merged:
        raise HubError(f"{folder} is a merged model (written by `export`): add --merged to push the whole model")
    if not any(folder.glob("*.safetensors")):
        raise HubError(f"{folder}: no *.safetensors weights; is it a folder written by `intentlora export`?")
    return sorted(f for f in folder.rglob("*") if f.is_file() and not _hidden(f, folder))


def _hidden(path: Path, folder: Path) -> bool:
    """Dot files and folders (staging leftovers, .cache) never go up."""
    return any(part.startswith(".") for part in path.relative_to(folder).parts)


def card_text(folder: Path, merged: bool, repo_id: str) -> str:
    """The folder's README.md (a run's written anew from its metrics if missing), naming `repo_id`."""
    folder = Path(folder)
    card = folder / CARD_FILE
    if card.is_file():
        text = card.read_text(encoding="utf-8")
    elif is_run_dir(folder):  # select_files has checked it is a finished run
        text = render_model_card(folder, read_metrics(folder), dataclasses.asdict(read_config(folder)), merged=False)
    else:
        raise HubError(f"{folder} has no model card (README.md): export it again with `intentlora export RUN_DIR {folder}` to write one")
    return text.replace(REPO_PLACEHOLDER, repo_id)


def plan(folder: Path, merged: bool, repo_id: str) -> tuple[list[tuple[str, Path, int]], str]:
    """([(path in the repo, local file, bytes)], card text): what `push` would upload, for --dry-run and push alike."""
    folder = Path(folder)
    files = [(f.relative_to(folder).as_posix(), f, f.stat().st_size) for f in select_files(folder, merged)]
    card = card_text(folder, merged, repo_id)
    if not any(name == CARD_FILE for name, _, _ in files):
        files.append((CARD_FILE, folder / CARD_FILE, len(card.encode("utf-8"))))
    return files, card


def push(folder: Path, repo_id: str, merged: bool = False, private: bool = False, revision: str | None = None, token: str | None = None) -> str:
    """Create the repository (if needed) and upload the files in one commit; returns the commit's URL.

    The token is `token`, else HF_TOKEN, else the cached `hf auth login`.
    Not tested offline: the upload is huggingface_hub's create_commit.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    files, _ = plan(folder, merged, repo_id)  # every refusal comes before the network
    token = token or get_token()
    if not token:
        raise HubError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id  # a bare name gets the user's namespace
    card = card_text(folder, merged, repo_id)
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=card.encode("utf-8") if name == CARD_FILE else str(path))
        for name, path, _ in files
    ]
    kind = "merged model" if merged else "LoRA adapter"
    commit = api.create_commit(repo_id, operations, commit_message=f"Upload {kind} with intentlora", revision=revision)
    return commit.commit_url


def describe(files: list[tuple[str, Path, int]]) -> list[str]:
    """One line a file, with its size: what --dry-run prints."""
    return [f"{size:>14,}  {name}" for name, _, size in files] + [f"{sum(size for _, _, size in files):>14,}  bytes in {len(files)} files"]

