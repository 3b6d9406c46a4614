"""`seqtest-tasks`: list every registered task with its parameters and baseline.

seqtest-tasks                     # every task: summary, parameters, baseline formula
seqtest-tasks temporal_order -v   # one task, with its full description
seqtest-tasks --import my_tasks   # also tasks registered by your own module
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from collections.abc import Sequence

from seqtest.errors import ConfigError
from seqtest.shutdown import skip_final_collections
from seqtest.tasks._base import Task, registered_tasks


def description(cls: type[Task]) -> str:
    """The task's own docstring, or its module's (a dataclass without a docstring gets a
    generated one that only repeats the signature)."""
    doc = cls.__doc__ or ""
    if not doc or doc.startswith(f"{cls.__name__}("):
        doc = sys.modules[cls.__module__].__doc__ or ""
    return doc.strip()


def summary_line(cls: type[Task]) -> str:
    """The first sentence-like paragraph of the description, on one line."""
    first = description(cls).split("\n\n")[0]
    return " ".join(first.split())


def parameters(cls: type[Task]) -> list[tuple[str, str, str]]:
    """(name, type, default) of each dataclass field."""
    rows = []
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            default = repr(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            default = repr(field.default_factory())
        else:
            default = "(required)"
        type_name = field.type if isinstance(field.type, str) else field.type.__name__
        rows.append((field.name, type_name, default))
    return rows


def default_baseline(cls: type[Task]) -> str:
    """The baseline at the default parameters, or why it cannot be computed here."""
    try:
        return f"{cls().baseline_loss:.6g}"
    except Exception as error:  # e.g. a dataset task without its data
        return f"n/a ({str(error).split(':')[0]})"


def describe(name: str, cls: type[Task], verbose: bool = False) -> str:
    lines = [f"{name}  ({cls.__module__}.{cls.__qualname__})", f"  {summary_line(cls)}"]
    metric = getattr(cls, "metric_name", None)
    lines.append(f"  loss: {cls.loss_kind}" + (f", metric: {metric}" if metric else ""))
    formula = getattr(cls, "baseline_formula", None) or "(no baseline_formula given)"
    lines.append(f"  baseline: {formula}")
    lines.append(f"  baseline at the defaults: {default_baseline(cls)}")
    lines.append("  parameters:")
    rows = parameters(cls)
    width = max((len(f"{n}: {t}") for n, t, _ in rows), default=0)
    for field_name, type_name, default in rows:
        lines.append(f"    {f'{field_name}: {type_name}':<{width}} = {default}")
    if verbose:
        lines.append("")
        lines.extend(f"  {line}".rstrip() for line in description(cls).splitlines())
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    skip_final_collections()
    parser = argparse.ArgumentParser(
        prog="seqtest-tasks",
        description="List the registered tasks with their parameters and baselines.",
    )
    parser.add_argument("names", nargs="*", help="only these tasks (default: all)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print full descriptions")
    parser.add_argument(
        "--import",
        dest="modules",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first, so the tasks it registers are listed too (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        for module in args.modules:
            importlib.import_module(module)
        tasks = registered_tasks()
    except ConfigError as error:  # e.g. a task name registered twice
        print(f"seqtest-tasks: {error}", file=sys.stderr)
        return 2
    unknown = [name for name in args.names if name not in tasks]
    if unknown:
        print(
            f"seqtest-tasks: unknown task {', '.join(unknown)}; registered: {', '.join(tasks)}",
            file=sys.stderr,
        )
        return 2
    chosen = args.names or list(tasks)
    print("\n\n".join(describe(name, tasks[name], args.verbose) for name in chosen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
