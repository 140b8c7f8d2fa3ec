"""Where tasks come from: our local task folder, the user's ``--include_path`` folders, and lm-eval's own.

lm-eval's ``TaskManager`` takes a list of include paths and does not follow symbolic links while it walks a
folder, so the folders are passed side by side, never linked under one root. Indexing lm-eval's whole
catalogue takes tens of seconds on a small CPU, so it is built only when a task is not in the given folders,
and once per process.
"""
from __future__ import annotations

import difflib
import functools
import os

from fastdllm_rt.errors import FastDLLMError

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")


class TaskError(FastDLLMError, ValueError):
    """A task name no folder and no lm-eval task defines, or an include path that does not exist."""


def include_paths(user_path=None) -> list[str]:
    """Our task folder, then the user's (lm-eval lets later folders override earlier ones)."""
    paths = [TASKS_DIR]
    for p in ([] if not user_path else user_path if isinstance(user_path, (list, tuple)) else [user_path]):
        p = os.path.abspath(os.path.expanduser(os.fspath(p)))
        if not os.path.isdir(p):
            raise TaskError(f"--include_path {p} is not a folder; pass the folder that holds your task yaml files")
        if p not in paths:
            paths.append(p)
    return paths


@functools.lru_cache(maxsize=4)
def _manager(include: tuple, defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include), include_defaults=defaults)


class Catalog:
    """Task lookups over the given include paths, lm-eval's catalogue added only when needed."""

    def __init__(self, include=None):
        self.include = tuple(include_paths() if include is None else include)

    @property
    def local(self):
        return _manager(self.include, False)

    @property
    def full(self):
        return _manager(self.include, True)

    def manager_for(self, tasks):
        """The smallest task manager that knows every name in ``tasks``."""
        local = self.local
        return local if all(local.match_tasks([t]) for t in tasks) else self.full

    def check(self, tasks) -> None:
        """Raise TaskError for the first name no task manager knows, with close names and our local tasks."""
        names = [t for t in tasks if not t.endswith(".yaml") and not os.path.isdir(t)]
        tm = self.manager_for(names)
        missing = [t for t in names if not tm.match_tasks([t])]
        if not missing:
            return
        close = difflib.get_close_matches(missing[0], tm.all_tasks, n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        ours = sorted(n for n in self.local.all_tasks)
        raise TaskError(f"unknown task {missing[0]!r}; {hint}local tasks: {', '.join(ours)}; lm-eval's tasks: "
                        f"`lm-eval ls tasks`; your own: --include_path DIR")
