"""Installs the import package ``regrow`` from this repository's root.

The repository root *is* the package (``package_dir={"regrow": "."}``), so the code folders become
``regrow.trainer``, ``regrow.comm``, ... and nothing top-level clashes with other distributions.
"""

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

TIERS = ["comm", "trainer", "checkpoint", "recovery", "launch"]
SUBPACKAGES = sorted(p for p in find_packages(where=".") if p.split(".")[0] in TIERS)
"""Every folder of the five tiers (``trainer.zero``, ``checkpoint.node``, ...), found rather than listed."""


class BuildPyWithoutSetup(build_py):
    """Keeps this ``setup.py`` out of the installed ``regrow`` package (the root folder is the package)."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if not (package == "regrow" and m[1] == "setup")]


setup(
    name="regrow",
    version="0.1.0",
    description="Fault-tolerant distributed training for PyTorch: sharded 8-bit ZeRO, in-memory snapshots, recovery",
    python_requires=">=3.11",
    package_dir={"regrow": "."},
    packages=["regrow"] + [f"regrow.{name}" for name in SUBPACKAGES],
    install_requires=[
        "torch>=2.4",
        "numpy",
        "zfec",
        "ray",
        "deepspeed",
    ],
    # transformers 4.50 is the first to honour `shift_labels` in its causal-LM loss, which regrow's "hf" loss
    # contract passes so that the model predicts exactly the sampler's targets (trainer/losses.py).
    extras_require={"test": ["pytest", "pytest-timeout"], "hf": ["transformers>=4.50", "safetensors"]},
    entry_points={"console_scripts": ["regrow = regrow.launch.cli:main"]},
    cmdclass={"build_py": BuildPyWithoutSetup},
)
