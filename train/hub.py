"""Can the base model load before anything starts? Local directory, bundled, or Hub id (cached, or one quick probe)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from lorabox.env.recipe import Recipe

# Set by `lorabox train` for its ranks once the model was found loadable, so each rank does not probe the Hub again.
CHECKED_ENV = "LORABOX_MODEL_CHECKED"
# One HEAD request, no retries: an unreachable Hub answers in well under this (refused, no DNS) or times out here.
PROBE_TIMEOUT_S = 5.0
# What from_pretrained reads, in the order transformers looks for it (modeling_utils: safetensors before bin).
WEIGHTS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
TOKENIZER = ("tokenizer_config.json", "tokenizer.json")


class ModelAccessError(Exception):
    """The base model cannot be loaded here; the message names the model, the cache and the command that fixes it."""


@dataclass(frozen=True)
class Cached:
    """A Hub model found in the local cache: the snapshot directory and the commit it holds."""

    snapshot: Path
    commit: str


def cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _label(repo: str, revision: str | None) -> str:
    return f"{repo} (revision {revision})" if revision else repo


def _download_command(repo: str, revision: str | None) -> str:
    return f"hf download {repo}" + (f" --revision {revision}" if revision else "")


def _gated_hint(repo: str) -> str:
    return (
        f"If the model is gated, accept its licence at https://huggingface.co/{repo} first and log in "
        "(`hf auth login`, or export HF_TOKEN)"
    )


def missing_files(snapshot: Path) -> list[str]:
    """What from_pretrained would still need to download into this cached snapshot; [] when it is complete."""
    missing = [] if (snapshot / "config.json").is_file() else ["config.json"]
    weights = next((snapshot / name for name in WEIGHTS if (snapshot / name).is_file()), None)
    if weights is None:
        missing.append("the weights (model.safetensors or its index)")
    elif weights.name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(weights.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError):
            shards = []
            missing.append(f"a readable {weights.name}")
        missing += [shard for shard in shards if not (snapshot / shard).is_file()]
    if not any((snapshot / name).is_file() for name in TOKENIZER):
        missing.append("the tokenizer (tokenizer_config.json)")
    return missing


def find_cached(repo: str, revision: str | None) -> tuple[Cached | None, list[str]]:
    """(the complete cached snapshot, []) or (None, what is missing). Reads the cache only, never the network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, "config.json", revision=revision)
    if not isinstance(found, str):
        return None, ["config.json"]
    snapshot = Path(found).parent
    missing = missing_files(snapshot)
    return (None, missing) if missing else (Cached(snapshot, snapshot.name), [])


def probe(repo: str, revision: str | None) -> tuple[str, str] | None:
    """None when the Hub serves the model's config.json to us; else (why, in a few words; the message to print).
    Raises nothing: every failure becomes a message (ModelAccessError is raised by the caller)."""
    from huggingface_hub import get_hf_file_metadata, get_token, hf_hub_url
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    token = "the token in use was refused" if get_token() else "no token is set"
    try:
        get_hf_file_metadata(hf_hub_url(repo, "config.json", revision=revision), timeout=PROBE_TIMEOUT_S)
        return None
    except GatedRepoError:  # a subclass of RepositoryNotFoundError: test it first
        return f"gated, {token}", _gated(repo, revision, token)
    except RevisionNotFoundError:
        return f"no revision {revision!r}", (
            f"model {repo} has no revision {revision!r} on the Hub; set model.revision to a branch, tag or commit "
            f"listed at https://huggingface.co/{repo}/tree/main"
        )
    except RepositoryNotFoundError:
        return f"not found, {token}", (
            f"model {repo}: no such model on the Hugging Face Hub ({token}). Check the spelling at "
            f"https://huggingface.co/models?search={repo.split('/')[-1]}; a private or gated model needs "
            "`hf auth login` or HF_TOKEN; a local copy is named by its directory path (./models/name)"
        )
    except HfHubHTTPError as error:
        code = error.response.status_code if error.response is not None else None
        if code in (401, 403):
            return f"refused ({code}), {token}", _gated(repo, revision, token)
        why = f"the Hub answered {code}"
    except Exception as error:  # no DNS, refused, timed out, TLS, proxy: all mean "cannot reach it from here"
        why = _network_failure(error)
    return f"unreachable ({why})", _unreachable(repo, revision, why)


def _network_failure(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def unreachable(repo: str, revision: str | None, repo_type: str) -> str | None:
    """Why the Hub cannot be reached for this repository (one request, no retries), or None when it answered,
    whatever it answered: a gated or missing repository is for the loader to name."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        HfApi().repo_info(repo, repo_type=repo_type, revision=revision, timeout=PROBE_TIMEOUT_S)
    except HfHubHTTPError:
        return None
    except Exception as error:  # as in probe(): every other failure means "cannot reach it from here"
        return _network_failure(error)
    return None


def _gated(repo: str, revision: str | None, token: str) -> str:
    return (
        f"model {repo} is gated on the Hugging Face Hub and {token}: accept its licence at "
        f"https://huggingface.co/{repo} (signed in), then log in here with `hf auth login` or export "
        f"HF_TOKEN=<a read token from https://huggingface.co/settings/tokens>; then run again "
        f"(or download it first: `{_download_command(repo, revision)}`)"
    )


def _unreachable(repo: str, revision: str | None, why: str) -> str:
    from huggingface_hub import constants

    return (
        f"model {_label(repo, revision)} is not in the Hugging Face cache ({cache_dir()}) and the Hub "
        f"({constants.ENDPOINT}) cannot be reached ({why}). Download it where there is network access with "
        f"`{_download_command(repo, revision)}` into that cache (HF_HOME or HF_HUB_CACHE), or set "
        f"model.name_or_path to a local directory. {_gated_hint(repo)}"
    )


def _offline(repo: str, revision: str | None, missing: list[str]) -> str:
    return (
        f"model {_label(repo, revision)} is not in the Hugging Face cache ({cache_dir()}; missing: "
        f"{', '.join(missing)}) and HF_HUB_OFFLINE=1 forbids downloading it. Download it with "
        f"`{_download_command(repo, revision)}` (with network, the same HF_HOME/HF_HUB_CACHE), or set "
        f"model.name_or_path to a local directory. {_gated_hint(repo)}"
    )


def check(recipe: Recipe) -> list[str]:
    """Raise ModelAccessError unless the recipe's model can be loaded; else lines saying where it comes from.
    Runs before the run directory is touched and before accelerate starts, so a model that cannot load costs
    seconds, not two rounds of download retries."""
    model = recipe.model
    name, revision = model.name_or_path, model.revision
    if model.is_bundled:
        return []
    if os.environ.get(CHECKED_ENV) == f"{name}@{revision}":
        return []
    local = Path(name).expanduser()
    if local.is_dir():
        missing = [f for f in missing_files(local) if not f.startswith("the tokenizer")]
        if missing:
            raise ModelAccessError(
                f"model directory {local} lacks {', '.join(missing)}: it is not a saved model "
                "(save_pretrained writes config.json and the weights there)"
            )
        return [f"base model from the local directory {local}"]
    from huggingface_hub.errors import HFValidationError

    try:
        cached, missing = find_cached(name, revision)
    except HFValidationError:
        raise ModelAccessError(
            f"model {name!r}: no such local directory, and not a Hub id (expected org/name, e.g. "
            "meta-llama/Llama-3.2-1B); use ./relative or /absolute paths for local copies"
        ) from None
    if is_offline():
        if cached is None:
            raise ModelAccessError(_offline(name, revision, missing))
        return [f"base model {name} from the Hugging Face cache, commit {cached.commit} (HF_HUB_OFFLINE=1)"]
    problem = probe(name, revision)
    if problem is None:
        where = f"cached at commit {cached.commit}" if cached else f"will be downloaded into {cache_dir()}"
        return [f"base model {name} on the Hub is accessible; {where}"]
    if cached is None:
        raise ModelAccessError(problem[1])
    # huggingface_hub falls back to a complete cached copy whatever the Hub answered (file_download.py,
    # _get_metadata_or_catch_error); offline mode skips its retries and per-file requests on the way there.
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"  # for the ranks `lorabox train` starts
    constants.HF_HUB_OFFLINE = True  # for this process: is_offline_mode() returns this value, read at import
    return [
        f"the Hugging Face Hub did not serve {name} ({problem[0]}): using the cached copy at commit {cached.commit} "
        "(HF_HUB_OFFLINE=1 for this run)"
    ]


def mark_checked(recipe: Recipe) -> None:
    """Tell this process's children (the ranks) that the model was found loadable."""
    os.environ[CHECKED_ENV] = f"{recipe.model.name_or_path}@{recipe.model.revision}"


def describe_base(recipe: Recipe) -> tuple[str, str]:
    """(the base model as a user would name it, its revision: the cached commit when known) for the model card."""
    model = recipe.model
    if model.is_bundled:
        return model.name_or_path, "built by lorabox from a fixed seed"
    if Path(model.name_or_path).is_dir():
        return model.name_or_path, "local directory"
    try:
        cached, _ = find_cached(model.name_or_path, model.revision)
    except Exception:  # an unreadable cache only costs the card its commit
        cached = None
    if cached is not None:
        return model.name_or_path, f"{model.revision or 'main'} (commit {cached.commit})"
    return model.name_or_path, model.revision or "main"
