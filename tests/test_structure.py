"""The house rules the code keeps (checked, so they stay kept): small modules, no import cycles, one train step for
both backends that reads the typed config and never the flags, CLI choices taken from the constants that define
them, no file written outside salt_megatron.files' atomic helpers."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "salt_megatron"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def test_no_module_longer_than_350_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 350}
    assert not long, long


def _import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):  # module-level and function-level imports alike
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                deps.update(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def test_no_import_cycle_in_the_package():
    graph, state, cycles = _import_graph(), {}, []

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_one_train_step_for_both_backends_reading_no_flags():
    from salt_megatron.training import backends, step

    source = inspect.getsource(step.train_step)
    assert "args." not in source and "args[" not in source
    # no second step function anywhere in the package
    steps = [(p.name, m) for p in PACKAGE.rglob("*.py") for m in re.findall(r"^def (train_step\w*)", p.read_text(), re.M)]
    assert steps == [("step.py", "train_step")], steps
    for backend in (backends.MegatronBackend, backends.DeepSpeedBackend):
        for method in ("zero_grad", "forward_backward", "optimizer_step", "save", "load"):
            assert callable(getattr(backend, method, None)), (backend, method)


def test_cli_choices_come_from_the_constants_that_define_them():
    from salt_megatron.data.scores import SCORE_NAMES
    from salt_megatron.data.selection import MODES
    from salt_megatron.kd import IMPLS
    from salt_megatron.schedule import TRANSITIONS
    from salt_megatron.training.arguments import build_pretrain_parser

    choices = {a.dest: tuple(a.choices) for a in build_pretrain_parser()._actions if a.choices}
    assert choices["kd_impl"] == IMPLS and choices["kd_data_selection"] == MODES
    assert choices["kd_select_by"] == SCORE_NAMES and choices["kd_transition"] == TRANSITIONS


def test_files_are_written_only_through_the_atomic_helpers():
    """No module but salt_megatron/files.py renames files into place or opens one for writing, except append-only
    logs (metrics, a stage's console log) and the checkpoint directory's own atomic rename."""
    allowed = {"files.py": "the helpers", "checkpointing.py": "renames a whole checkpoint directory",
               "metrics.py": "append-only metrics log", "demo.py": "a stage's console log"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name in allowed:
            continue
        for line in path.read_text().splitlines():
            renames = re.search(r"os\.replace\(|os\.rename\(", line)
            # writing is fine into a temporary that atomic_files handed out (its names say tmp)
            writes = re.search(r"open\([^)]*[\"'][wa]b?[\"']|np\.save|\.savefig\(", line) and "tmp" not in line
            if renames or writes:
                offenders.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert not offenders, offenders
