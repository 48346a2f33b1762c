"""Package list for setuptools (metadata and dependencies are in pyproject.toml).

The Hydra configs live in the top-level `configs/` folder of the checkout and ship inside the
package as `elbo_t2ialign/configs/`, so an installed wheel finds them (`elbo_t2ialign.cli.config_dir`).
"""

from setuptools import find_namespace_packages, setup

config_packages = [
    f"elbo_t2ialign.{name}" for name in find_namespace_packages(include=["configs", "configs.*"])
]
setup(
    packages=find_namespace_packages(include=["elbo_t2ialign", "elbo_t2ialign.*"]) + config_packages,
    package_dir={"elbo_t2ialign.configs": "configs"},
)
