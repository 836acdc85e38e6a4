"""How the package hangs together: one installable namespace, one-way layers, a light CLI."""

from __future__ import annotations

import ast
import multiprocessing
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dino_vos.errors import BackboneError
from dino_vos.registry import (
    RegisteredBackbone,
    backbone_names,
    register_backbone,
    registered_backbone,
)
from dino_vos.spec import BackboneSpec, PropagationConfig, ResizeSpec

REPO = Path(__file__).resolve().parents[1]
#: Installed package name -> folder in the repository (see pyproject.toml's package-dir).
PACKAGE_DIRS = {
    "dino_vos": REPO / "dino_vos",
    "dino_vos.eval": REPO / "eval",
    "dino_vos.pretrain": REPO / "pretrain",
}
#: Modules that load before a command runs: none of them may import torch.
LIGHT_MODULES = [
    "dino_vos",
    "dino_vos.spec",
    "dino_vos.registry",
    "dino_vos.defaults",
    "dino_vos.errors",
    "dino_vos.limits",
    "dino_vos.console",
    "dino_vos.cli",
    "dino_vos.cli.options",
    "dino_vos.cli.propagate",
    "dino_vos.cli.export",
    "dino_vos.cli.eval",
    "dino_vos.cli.davis",
    "dino_vos.cli.youtube_vos",
    "dino_vos.cli.baselines",
    "dino_vos.cli.pretrain",
]


def module_files() -> dict[str, Path]:
    """Every module of the installed package -> its source file."""
    modules: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _run(code: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_every_module_imports_on_its_own():
    """No import cycle: each module imported first in a process that holds no dino_vos module.

    The heavy third-party libraries are imported once in a parent process that then forks (they
    cannot hide a cycle among our modules); every child imports exactly one of our modules.
    """
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs the fork start method")
    names = [name for name in module_files() if name != "dino_vos"]
    assert len(names) >= 40  # the walk found the whole package
    code = f"""
    import importlib, multiprocessing, sys, traceback
    import cv2, numpy, scipy, torch, timm, torchvision, click, rich, safetensors  # noqa

    def import_first(name, queue):
        try:
            importlib.import_module(name)
            queue.put(None)
        except BaseException:
            queue.put(traceback.format_exc(limit=4))

    assert not [m for m in sys.modules if m.startswith("dino_vos")]
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    failures = []
    for name in {names!r}:
        child = context.Process(target=import_first, args=(name, queue))
        child.start()
        error = queue.get(timeout=120)
        child.join()
        if error:
            failures.append(name + ": " + error)
    print("\\n".join(failures))
    sys.exit(1 if failures else 0)
    """
    result = _run(code)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cli_modules_help_and_input_errors_load_no_torch():
    code = f"""
    import importlib, sys
    for name in {LIGHT_MODULES!r}:
        importlib.import_module(name)
    from click.testing import CliRunner
    from dino_vos.cli import main
    runner = CliRunner()
    import click

    def walk(group, prefix):  # every command and group, as the lazy groups list them
        context = click.Context(group)
        for name in group.list_commands(context):
            command = group.get_command(context, name)
            yield [*prefix, name]
            if isinstance(command, click.Group):
                yield from walk(command, [*prefix, name])

    commands = [[], *walk(main, [])]
    assert len(commands) >= 13 and ["eval", "youtube-vos"] in commands, commands
    for args in commands:
        result = runner.invoke(main, [*args, "--help"])
        assert result.exit_code == 0, (args, result.output)
        assert "Usage:" in result.output
    heavy = ("torch", "timm", "torchvision", "cv2", "matplotlib", "decord")
    print("help:", sorted(m for m in heavy if m in sys.modules))
    for command in ("propagate", "attention", "features"):
        args = [command, "missing.mp4", "--out", "out"] + (["--mask", "m.png"] if command ==
                                                             "propagate" else [])
        result = runner.invoke(main, args)
        assert result.exit_code == 2 and "input not found: missing.mp4" in result.output
    print("errors:", sorted(m for m in ("torch", "timm", "torchvision") if m in sys.modules))
    """
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["help: []", "errors: []"]


def test_library_modules_never_import_click_or_the_cli():
    offenders = []
    for name, path in module_files().items():
        if name.startswith("dino_vos.cli") or name == "dino_vos.__main__":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            imported: list[str] = []
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported = [node.module]
            offenders += [
                f"{name}: {module}"
                for module in imported
                if module == "click" or module.startswith(("click.", "dino_vos.cli"))
            ]
    assert offenders == []


def _imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return names


def test_the_library_never_imports_eval_or_pretrain():
    """dino_vos (without its CLI) is the layer eval/ and pretrain/ build on, not the reverse."""
    offenders = [
        f"{name}: {module}"
        for name, path in module_files().items()
        if not name.startswith(("dino_vos.cli", "dino_vos.eval", "dino_vos.pretrain"))
        for module in _imports(path)
        if module.startswith(("dino_vos.eval", "dino_vos.pretrain"))
    ]
    assert offenders == []


def test_one_installed_namespace(tmp_path: Path):
    result = _run(
        """
        import importlib.util, sys
        import dino_vos.eval.davis_metrics, dino_vos.pretrain.config
        print([importlib.util.find_spec(name) is None for name in ("eval", "pretrain", "tests")])
        print(dino_vos.eval.davis_metrics.__name__, dino_vos.pretrain.config.__name__)
        """,
        cwd=tmp_path,  # not the repository: what an installed package offers
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == [
        "[True, True, True]",
        "dino_vos.eval.davis_metrics dino_vos.pretrain.config",
    ]


def test_backbone_spec_is_frozen_picklable_and_builds_the_same_model():
    spec = BackboneSpec(
        "dino_vos_tiny", random_init=True, seed=3, resize=ResizeSpec(96, "patch"), device="cpu"
    )
    copy = pickle.loads(pickle.dumps(spec))
    assert copy == spec and hash(copy) == hash(spec)
    with pytest.raises(AttributeError):
        spec.seed = 4  # type: ignore[misc]
    from dino_vos.backbones import weights_fingerprint

    one, two = spec.build(), copy.build()
    assert weights_fingerprint(one.backbone) == weights_fingerprint(two.backbone)
    other = BackboneSpec("dino_vos_tiny", random_init=True, seed=4, device="cpu").build_backbone()
    assert weights_fingerprint(other) != weights_fingerprint(one.backbone)
    assert one.resize == ResizeSpec(96, "patch") and one.input_size(100, 150) == (96, 144)
    assert BackboneSpec(weights=Path("w.pth")).weights == "w.pth"  # paths stored as str


def test_registry_names_and_errors():
    assert {"dino_vits8", "dino_vits16", "dino_vitb8", "dino_vitb16"} <= set(backbone_names())
    entry = registered_backbone("dino_vits8")
    assert entry is not None and entry.timm_name == "vit_small_patch8_224.dino"
    assert entry.checkpoint_file == "dino_deitsmall8_pretrain.pth"
    assert registered_backbone("vit_small_patch8_224") is None
    with pytest.raises(ValueError, match="registered twice"):
        register_backbone(lambda: RegisteredBackbone("dino_vits8", "again"))
    from dino_vos.backbones import load_backbone

    with pytest.raises(BackboneError, match="unknown backbone 'dino_vitz8'"):
        load_backbone("dino_vitz8", pretrained=False)


def test_propagation_defaults_are_the_reference_protocol():
    assert PropagationConfig().to_dict() == {
        "topk": 5,
        "context": 7,
        "radius": 12,
        "temperature": 0.1,
        "max_chunk_bytes": 32 * 2**20,
        "max_references": 5,
    }
