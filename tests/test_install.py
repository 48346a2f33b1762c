"""The package as users meet it outside the checkout: configs found from an installed wheel, and a
`configs/` folder of the working directory taking precedence over the shipped ones."""

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from elbo_t2ialign.cli import config_dir, hydra_config_dir

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_are_the_checkouts():
    assert config_dir() == ROOT / "configs"
    assert {p.name for p in config_dir().iterdir()} >= {
        "segment.yaml",
        "generate.yaml",
        "explain.yaml",
        "model",
    }


def test_working_directory_configs_come_first(tmp_path, monkeypatch):
    (tmp_path / "configs" / "model").mkdir(parents=True)
    (tmp_path / "configs" / "elbo").mkdir()
    shipped = config_dir()
    mine = (shipped / "model" / "shapes.yaml").read_text().replace("name: shapes", "name: mine")
    (tmp_path / "configs" / "model" / "mine.yaml").write_text(mine)
    default = (shipped / "elbo" / "default.yaml").read_text()
    assert "strength: 3.0 " in default
    (tmp_path / "configs" / "elbo" / "default.yaml").write_text(
        default.replace("strength: 3.0 ", "strength: 5.0 ")
    )

    def composed(cwd: Path, model: str):
        monkeypatch.chdir(cwd)
        with initialize_config_dir(config_dir=hydra_config_dir(), version_base="1.3"):
            return compose("segment", overrides=[f"model={model}"])

    shipped_cfg = composed(tmp_path.parent, "shapes")  # no configs/ there: the shipped files only
    assert shipped_cfg.elbo.strength == 3 and shipped_cfg.model.name == "shapes"
    cfg, mine_cfg = composed(tmp_path, "shapes"), composed(tmp_path, "mine")
    assert cfg.elbo.strength == 5  # ./configs/elbo/default.yaml replaces the shipped one
    assert mine_cfg.model.name == "mine" and mine_cfg.model.id == shipped_cfg.model.id  # a new group member
    assert cfg.dataset.name == "voc"  # groups the user did not copy still come from the package


def _build_fresh_environment(tmp_path: Path) -> Path:
    """The built wheel installed into a new virtual environment that sees this environment's
    dependencies (not its editable elbo_t2ialign): what `pip install elbo-t2ialign` gives a user."""
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv*", "runs", "datasets", "build", "dist", "*.egg-info", "__pycache__"
        ),
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    wheels = tmp_path / "wheels"
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, source], check=True)
    (wheel,) = wheels.glob("elbo_t2ialign-*.whl")
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", env], check=True)
    python = env / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # a plain path entry: this environment's packages, without running its .pth files (the editable hook)
    (Path(purelib) / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([*pip, "--python", python, "install", "--no-deps", "--no-index", wheel], check=True)
    return python


def test_wheel_runs_explain_and_segment_from_an_empty_folder(tmp_path):
    python = _build_fresh_environment(tmp_path)
    work = tmp_path / "empty"
    work.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([python, *args], cwd=work, env=env, capture_output=True, text=True, timeout=600)

    where = run("-c", "import elbo_t2ialign; print(elbo_t2ialign.__file__)")
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(tmp_path / "env"), (
        where.stdout
    )  # the wheel, not the checkout
    assert run("-m", "elbo_t2ialign.testbed.world", "--ensure").returncode == 0

    image = "datasets/shapes/images/val_00018.png"
    explained = run("-m", "elbo_t2ialign.explain", image, "cross", "triangle", "elbo.elbo_timesteps=[1,501]")
    assert explained.returncode == 0, explained.stderr[-2000:]
    result = json.loads((work / "runs/explain/val_00018-1/result.json").read_text())
    assert set(result["words"]) == {"cross", "triangle"}

    segmented = run(
        "-m",
        "elbo_t2ialign.segment",
        "model=shapes",
        "dataset=shapes",
        "elbo=shapes",
        "num_images=2",
        "progress=false",
        "device=cpu",
        "elbo.elbo_timesteps=[1,501]",
        "elbo.collect_timesteps=[20]",
        "output_dir=runs/seg",
    )
    assert segmented.returncode == 0, segmented.stderr[-2000:]
    assert len(list((work / "runs/seg/maps").iterdir())) == 2
    evaluated = run("-m", "elbo_t2ialign.evaluate", "runs/seg")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads((work / "runs/seg/metrics.json").read_text())["num_images"] == 2
