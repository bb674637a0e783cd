"""The import structure: imports point one way, fdm_core.posterior < kernels < fdm_core < fdm_train <
fdm_infer < fdm_export < fdm_eval < benchmarks; inference, export and evaluation stand on the core alone, never on training; nothing
below fdm_eval imports it but a command line that offers its commands; no two modules import each other,
directly or around a loop; and the benchmarks import the project as a package, never by editing sys.path.
Imports inside functions count: a lazy import is still a dependency. Read from the source with `ast`,
nothing is imported."""
from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT

PACKAGES = ["kernels", "fdm_core", "fdm_train", "fdm_infer", "fdm_export", "fdm_eval", "benchmarks"]
# From the bottom; a module is in the layer of the longest entry that names it or a package above it.
# fdm_core.posterior, the DDPM step's arithmetic, is the one module of fdm_core below the kernels: the DDPM
# sampler steps with it and the kernels' plain-torch reference fuses it, so it imports nothing of the project.
LAYERS = ["fdm_core.posterior", *PACKAGES]
# Beside the order: packages that must not import another one at all.
APART = {"fdm_infer": "fdm_train", "fdm_export": "fdm_train", "fdm_eval": "fdm_train"}
# The one kind of upward import: a command line (a package's `cli` module) offering the commands of
# evaluation and benchmarking beside its own (`fdm-infer evaluate`, `fdm-infer bench`).
COMMANDS_FROM_ABOVE = "fdm_eval"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imported(tree: ast.AST, name: str, is_package: bool, modules) -> set[str]:
    """The project modules a module's source imports (`from pkg import sub` names the module pkg.sub)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported(ast.parse(path.read_text()), name, path.name == "__init__.py", modules) - {name}
            for name, path in modules.items()}


def is_command_line(module: str) -> bool:
    return module.split(".")[-1] == "cli"


def layer_of(module: str) -> int:
    named = [entry for entry in LAYERS if module == entry or module.startswith(entry + ".")]
    return LAYERS.index(max(named, key=len))


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{src} imports {dst}" for src, targets in graph.items() for dst in targets
                  if layer_of(dst) > layer_of(src)
                  and not (is_command_line(src) and dst.split(".")[0] == COMMANDS_FROM_ABOVE))


def path_edits(root: Path) -> list[str]:
    """The files under `root` that change sys.path (a script that finds the project by editing it runs only
    from where its author stood)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                    and node.value.id == "sys"):
                found.append(str(path.relative_to(root)))
                break
    return found


def imports_across(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{src} imports {dst}" for src, targets in graph.items() for dst in targets
                  if APART.get(src.split(".")[0]) == dst.split(".")[0])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_checks_catch_what_they_are_for():
    graph = {"kernels.ops": {"fdm_core.model"}, "fdm_core.model": {"kernels.ops"},
             "fdm_infer.a": {"fdm_infer.b"}, "fdm_infer.b": {"fdm_infer.c"}, "fdm_infer.c": {"fdm_infer.a"}}
    assert upward_imports(graph) == ["kernels.ops imports fdm_core.model"]
    assert upward_imports({"kernels.reference": {"fdm_core.posterior"}, "fdm_core.posterior": {"kernels"}}) \
        == ["fdm_core.posterior imports kernels"]
    assert upward_imports({"fdm_infer.cli": {"fdm_eval.cli"}, "fdm_infer.api": {"fdm_eval.metrics"},
                           "fdm_infer.engines": {"fdm_export.onnx_export"}, "fdm_eval.cli": set()}) \
        == ["fdm_infer.api imports fdm_eval.metrics", "fdm_infer.engines imports fdm_export.onnx_export"]
    assert imports_across({"fdm_export.cli": {"fdm_train.util", "fdm_core.util"}, "fdm_train.cli": {"fdm_core.util"}}) \
        == ["fdm_export.cli imports fdm_train.util"]
    assert sorted(cycles(graph)) == [["fdm_core.model", "kernels.ops"], ["fdm_infer.a", "fdm_infer.b", "fdm_infer.c"]]


def test_the_graph_is_read_from_the_tree():
    graph = import_graph()
    assert {"kernels", "fdm_core.model", "fdm_infer.engines.base", "fdm_export.onnx_export", "fdm_eval.evaluate",
            "benchmarks.emergence.run"} <= set(graph)
    assert "fdm_core.model" in graph["fdm_export.onnx_export"]
    assert "fdm_eval.cli" in graph["fdm_infer.cli"]
    assert "kernels.reference" in graph["kernels.ops"]  # `from kernels import reference as ref`
    # the DDPM step's arithmetic is the sampler's, and the kernels import it, not the reverse
    assert "fdm_core.posterior" in graph["kernels.reference"] and "fdm_core.posterior" in graph["fdm_core.samplers"]
    assert not any(m.startswith("kernels") for m in graph["fdm_core.samplers"] | graph["fdm_core.diffusion"])


def test_imports_point_one_way():
    assert upward_imports(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_inference_and_export_do_not_import_training():
    assert imports_across(import_graph()) == []


def test_only_command_lines_and_benchmarks_import_evaluation():
    graph = import_graph()
    importers = sorted({src for src, targets in graph.items() for dst in targets
                        if dst.split(".")[0] == "fdm_eval" and src.split(".")[0] not in ("fdm_eval", "benchmarks")})
    assert importers and all(is_command_line(src) for src in importers), importers


def test_evaluation_stands_on_the_core_and_inference():
    graph = import_graph()
    used = {dst.split(".")[0] for src, targets in graph.items() if src.startswith("fdm_eval") for dst in targets}
    assert {"fdm_core", "fdm_infer"} <= used <= {"kernels", "fdm_core", "fdm_infer", "fdm_export", "fdm_eval"}


def test_the_benchmarks_do_not_edit_sys_path(tmp_path):
    (tmp_path / "script.py").write_text("import sys\nsys.path.insert(0, '..')\n")
    (tmp_path / "clean.py").write_text("import sys\nprint(sys.argv)\n")
    assert path_edits(tmp_path) == ["script.py"]
    assert path_edits(ROOT / "benchmarks") == []


# ----- each option's default written once -----

# The packages whose command lines are scanned, and the library modules whose public functions take the
# options' values: a default of either is the option's declaration's, never a literal of its own.
OPTION_PACKAGES = ["fdm_core", "fdm_train", "fdm_infer", "fdm_export", "fdm_eval"]
LIBRARY_MODULES = ["fdm_infer/api.py", "fdm_infer/sampling.py", "fdm_infer/segment.py", "fdm_infer/refine.py",
                   "fdm_infer/outputs.py", "fdm_eval/evaluate.py", "fdm_eval/scene_scores.py",
                   "fdm_eval/baselines.py", "fdm_eval/fid.py", "fdm_export/onnx_export.py",
                   "fdm_export/segmentation_export.py", "fdm_export/trt_build.py", "fdm_core/checkpoint.py",
                   "fdm_core/scenes.py", "fdm_train/synth.py"]
# Parameters named like an option that are not that option: (module, function, parameter).
NOT_THE_OPTION = {
    ("fdm_infer/sampling.py", "trajectory_picture", "count"),  # the samples of the picture, not synth's --count
    ("fdm_infer/segment.py", "segmentation_noise", "device"),  # where the noise is drawn, not --device
    ("fdm_infer/segment.py", "segment_batches", "workers"),  # the label threads of one call (0: the caller's)
    ("fdm_eval/evaluate.py", "evaluate_prior", "name"),  # the prior's row, not the model's --name
    ("fdm_eval/scene_scores.py", "generate_and_score", "n"),  # the scenes scored, not generate's -n
    ("fdm_eval/baselines.py", "kmeans", "iterations"),  # Lloyd iterations, not --grabcut-rounds
    ("fdm_eval/fid.py", "load_inception", "device"),  # a device picked already
    ("fdm_eval/fid.py", "inception_features", "device"),
    ("fdm_eval/fid.py", "compute_fid", "device"),  # the library's CPU unless told; the command's --device auto
    ("fdm_export/segmentation_export.py", "example_inputs", "seed"),  # a parity check's random inputs
    ("fdm_core/checkpoint.py", "save_checkpoint", "dtype"),  # a training checkpoint's storage, not slim's --dtype
    # A library call writes where it is told; the command lines refuse to replace a file without --overwrite.
    ("fdm_export/onnx_export.py", "export_onnx", "overwrite"),
    ("fdm_export/segmentation_export.py", "export_segmentation", "overwrite"),
    ("fdm_core/checkpoint.py", "slim_checkpoint", "overwrite"),
}


def is_literal(node: ast.AST | None) -> bool:
    """A number, string or bool written out (or a tuple/list of them), other than None, False, "" and ()."""
    if isinstance(node, ast.Constant):
        return not (node.value is None or node.value is False or node.value == "")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return is_literal(node.operand)
    if isinstance(node, (ast.Tuple, ast.List)):
        return bool(node.elts) and all(is_literal(e) or isinstance(e, ast.Constant) for e in node.elts)
    return False


def call_name(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return f"{func.value.id}.{func.attr}"
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def literal_option_defaults(tree: ast.AST, where: str) -> list[str]:
    """The click.option / click.argument calls of a module whose `default=` is a literal."""
    return [f"{where}:{node.lineno}: {call_name(node)}(..., default={ast.unparse(kw.value)})"
            for node in ast.walk(tree) if isinstance(node, ast.Call)
            and call_name(node) in ("click.option", "click.argument")
            for kw in node.keywords if kw.arg == "default" and is_literal(kw.value)]


def declared_names(tree: ast.AST) -> set[str]:
    """The Python names of the options a module declares: each long or short flag of a click.option or a
    `Setting`, as a parameter name (--batch-size: batch_size), and the parameter name given."""
    names = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and call_name(node).split(".")[-1] in ("option", "Setting")):
            continue
        strings = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        strings += [e.value for a in node.args if isinstance(a, (ast.Tuple, ast.List)) for e in a.elts
                    if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        strings += [kw.value.value for kw in node.keywords if kw.arg == "name" and isinstance(kw.value, ast.Constant)
                    and isinstance(kw.value.value, str)]
        for s in strings:
            for part in s.split("/"):
                if part.startswith("-"):
                    names.add(part.lstrip("-").replace("-", "_"))
                elif part.isidentifier():
                    names.add(part)
    return names


def literal_keyword_defaults(tree: ast.AST, where: str, options: set[str], exempt=frozenset()) -> list[str]:
    """The public functions and methods of a module with a literal default for a parameter named like an option
    (but those of `exempt`: (where, function, parameter))."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_") \
                and node.name != "__init__":
            continue
        args = node.args
        pairs = list(zip(args.args[len(args.args) - len(args.defaults):], args.defaults))
        pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
        found += [f"{where}:{node.lineno}: {node.name}({a.arg}={ast.unparse(d)})" for a, d in pairs
                  if a.arg in options and is_literal(d) and (where, node.name, a.arg) not in exempt]
    return found


def option_sources() -> dict[str, ast.AST]:
    return {str(p.relative_to(ROOT)): ast.parse(p.read_text())
            for package in OPTION_PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def test_the_default_checks_catch_what_they_are_for():
    cli = ast.parse('@click.option("--seed", type=SEED, default=0, help="x")\n'
                    '@click.option("--steps", default=STEPS.default)\n'
                    '@click.option("--device", default="auto")\n'
                    '@click.option("--check/--no-check", default=True)\n'
                    '@click.option("--limit", default=None)\n'
                    '@click.option("--fast", is_flag=True, default=False)\n'
                    '@click.argument("paths", nargs=-1, default=())\n'
                    'def f(): pass\n')
    assert [line.split(": ", 1)[1] for line in literal_option_defaults(cli, "m")] == [
        "click.option(..., default=0)", "click.option(..., default='auto')", "click.option(..., default=True)"]
    assert declared_names(cli) == {"seed", "steps", "device", "check", "no_check", "limit", "fast"}
    assert declared_names(ast.parse('T = Setting(("--timestep",), 30, name="t")')) == {"timestep", "t"}
    lib = ast.parse("def run(x, seed=0, *, steps=STEPS.default, device='auto', other=3, limit=None): pass\n"
                    "def _private(seed=0): pass\n"
                    "class A:\n    def __init__(self, batch_size=-16): pass\n")
    assert [line.split(": ", 1)[1] for line in literal_keyword_defaults(lib, "m", {"seed", "steps", "device",
                                                                                    "batch_size", "limit"})] \
        == ["run(seed=0)", "run(device='auto')", "__init__(batch_size=-16)"]


def test_no_option_default_is_written_in_a_command():
    sources = option_sources()
    found = [line for where, tree in sources.items() for line in literal_option_defaults(tree, where)]
    assert found == [], "\n".join(found)


def test_the_library_takes_its_defaults_from_the_options():
    sources = option_sources()
    options = set().union(*(declared_names(tree) for tree in sources.values()))
    assert {"seed", "batch_size", "timestep", "steps", "sampler", "clip", "device", "threads", "smooth"} <= options
    found = [line for where in LIBRARY_MODULES
             for line in literal_keyword_defaults(sources[where], where, options, NOT_THE_OPTION)]
    assert found == [], "\n".join(found)
