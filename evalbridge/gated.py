"""Gated datasets, checked before any model is loaded.

GPQA (``Idavidrein/gpqa``) is gated on the Hugging Face hub: without a token with access, a job dies halfway
through, after the model was loaded and other tasks ran. ``preflight`` finds the selected tasks whose datasets
need credentials, resolves a token the way huggingface_hub does, and checks access (or, offline, that a cached
copy exists). Every failure is a message saying exactly what to do. The token is never printed or logged.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .catalog import Catalog, include_paths

# Datasets known to need an accepted licence on the hub; extend with FASTDLLM_GATED_DATASETS=a/b,c/d.
KNOWN_GATED = {"Idavidrein/gpqa"}


@dataclass
class GatedProblem:
    task: str
    dataset: str
    message: str


def gated_datasets() -> set[str]:
    extra = os.environ.get("FASTDLLM_GATED_DATASETS", "")
    return KNOWN_GATED | {d.strip() for d in extra.split(",") if d.strip()}


def resolve_token() -> tuple[str | None, str | None]:
    """(token, where it came from), in huggingface_hub's order: HF_TOKEN, the older HUGGING_FACE_HUB_TOKEN,
    the file HF_TOKEN_PATH or $HF_HOME/token (default ~/.cache/huggingface/token), and the legacy
    ~/.huggingface/token."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        value = os.environ.get(var, "").strip()
        if value:
            return value, f"${var}"
    hf_home = os.path.expanduser(os.environ.get("HF_HOME", os.path.join("~", ".cache", "huggingface")))
    files = [os.environ.get("HF_TOKEN_PATH"), os.path.join(hf_home, "token"),
             os.path.expanduser(os.path.join("~", ".huggingface", "token"))]
    for path in files:
        if path and os.path.isfile(path):
            with open(path) as f:
                value = f.read().strip()
            if value:
                return value, path
    return None, None


def task_datasets(tasks: list[str], catalog: Catalog | None = None) -> dict[str, str | None]:
    """{task: dataset_path} for the selected tasks, groups and tags expanded, without loading any data."""
    from lm_eval.tasks._index import Kind

    tm = (catalog or Catalog()).manager_for(tasks)
    index = tm.task_index
    out: dict[str, str | None] = {}
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        entry = index.get(name)
        if entry is None:
            for match in tm.match_tasks([name]):
                if match != name:
                    visit(match)
            return
        cfg = entry.cfg or {}
        if entry.kind in (Kind.TASK, Kind.PY_TASK):
            out[name] = cfg.get("dataset_path")
        elif entry.kind is Kind.GROUP:
            for sub in cfg.get("task", []):
                visit(sub if isinstance(sub, str) else sub.get("task"))
        elif entry.kind is Kind.TAG:
            for other, e in index.items():
                if name in e.tags:
                    visit(other)

    for t in tasks:
        visit(t)
    return out


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _cached(dataset: str) -> bool:
    hf_home = os.path.expanduser(os.environ.get("HF_HOME", os.path.join("~", ".cache", "huggingface")))
    hub = os.environ.get("HF_HUB_CACHE", os.path.join(hf_home, "hub"))
    ds_cache = os.environ.get("HF_DATASETS_CACHE", os.path.join(hf_home, "datasets"))
    owner_name = dataset.replace("/", "--")
    candidates = [os.path.join(hub, f"datasets--{owner_name}"), os.path.join(ds_cache, dataset.replace("/", "___"))]
    return any(os.path.isdir(c) and os.listdir(c) for c in candidates)


def no_token_message(dataset: str) -> str:
    return (f"{dataset} is gated and no Hugging Face token was found (HF_TOKEN, HUGGING_FACE_HUB_TOKEN, "
            f"$HF_HOME/token, ~/.huggingface/token). Accept the dataset's terms at "
            f"https://huggingface.co/datasets/{dataset}, create a read token at "
            f"https://huggingface.co/settings/tokens, then `export HF_TOKEN=...` or run `huggingface-cli login`.")


def check_access(dataset: str, token: str | None, source: str | None) -> str | None:
    """None when the dataset can be read; otherwise the message for the user."""
    url = f"https://huggingface.co/datasets/{dataset}"
    if _offline():
        if _cached(dataset):
            return None
        return (f"{dataset} is gated and the hub is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE), and no cached "
                f"copy was found under HF_HOME. Run once with network access and a token that has access "
                f"({url}), or point HF_HOME at a cache that holds it.")
    if token is None:
        return no_token_message(dataset)
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hub_errors

    try:
        HfApi().auth_check(dataset, repo_type="dataset", token=token)
    except hub_errors.GatedRepoError:
        return (f"the token from {source} has no access to the gated dataset {dataset}. Accept its terms at {url} "
                f"with the account that owns the token (approval can take a while), then run again.")
    except hub_errors.RepositoryNotFoundError:
        return (f"the hub says {dataset} does not exist for the token from {source} (private, or a wrong id). "
                f"Check the task's dataset_path and that the token belongs to an account with access.")
    except Exception as e:  # noqa: BLE001 - network trouble: say so, without the token
        return (f"could not check access to {dataset} ({type(e).__name__}); check the network, or set "
                f"HF_HUB_OFFLINE=1 with a cached copy.")
    return None


def preflight(tasks: list[str], catalog: Catalog | None = None) -> list[GatedProblem]:
    """Problems that would stop the run on a gated dataset; empty when there are none."""
    wanted = gated_datasets()
    needs = {t: d for t, d in task_datasets(tasks, catalog).items() if d in wanted}
    if not needs:
        return []
    token, source = resolve_token()
    problems, verdict = [], {}
    for task, dataset in sorted(needs.items()):
        if dataset not in verdict:
            verdict[dataset] = check_access(dataset, token, source)
        if verdict[dataset]:
            problems.append(GatedProblem(task, dataset, verdict[dataset]))
    return problems


def main(argv=None) -> int:
    """``python -m evalbridge.gated --tasks a,b [--include_path DIR] [--check-access]``: exit 2 with a message
    when a selected task needs a gated dataset and no token resolves (or, with --check-access, when the token
    has no access). Used by sbatch/run.sh before it submits anything; never prints the token."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m evalbridge.gated")
    ap.add_argument("--tasks", required=True)
    ap.add_argument("--include_path")
    ap.add_argument("--check-access", action="store_true")
    args = ap.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    catalog = Catalog(include_paths(args.include_path))
    if args.check_access:
        problems = preflight(tasks, catalog)
    else:
        wanted = gated_datasets()
        needs = {t: d for t, d in task_datasets(tasks, catalog).items() if d in wanted}
        token, _ = resolve_token()
        problems = [] if (token or not needs) else [
            GatedProblem(t, d, no_token_message(d)) for t, d in sorted(needs.items())]
    for p in problems:
        print(f"[fastdllm] task {p.task} needs the gated dataset {p.dataset}: {p.message}", file=sys.stderr)
    return 2 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
