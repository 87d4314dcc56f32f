"""Install diffusers-gfprune into an existing environment.

``install_requires`` declares compatible ranges, as diffusers, peft and accelerate do: installing this library
keeps the user's torch, numpy, ... when they lie in the range. The lower bounds are tested: ``.ci/lower_bounds``
installs torch 2.13.0 / torchvision 0.28.0 and every other direct dependency at its lowest allowed version
(``uv pip install --resolution lowest-direct``; these bounds are what that resolution installs) and runs a fast
subset of the tests; the exact known-good set the
whole suite runs with is ``constraints.txt`` (``pip install -e ".[test]" -c constraints.txt``).
torch-fidelity needs torchvision, and a torchvision built for another torch breaks ``import diffusers``: keep the
torchvision that matches your torch (torchvision pins its torch exactly, so pip keeps the pair consistent).
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.13,<3",
    "torchvision>=0.28",
    "diffusers>=0.42,<1",
    "torch-pruning>=1.6,<2",
    "torch-fidelity>=0.4,<0.5",
    "accelerate>=1.10,<2",
    "huggingface_hub>=2.0,<3",
    "datasets>=5.1,<6",
    "safetensors>=0.8",
    "scikit-learn>=1.5",
    "scikit-image>=0.26,<1",  # ships the photographs of the built-in "photos" data set
    "scipy>=1.13",
    "numpy>=2.0,<3",
    "torchmetrics>=1.6",
    "matplotlib>=3.9",
    "pillow>=13.0",
    "tqdm>=4.66.3",
    "tensorboard>=2.17",  # the scripts' default tracker (--report_to tensorboard), as in diffusers' examples
]

setup(
    name="diffusers-gfprune",
    version="0.1.0",
    description="Structured gradient-flow pruning of diffusers UNet2DModel DDPMs into slim, loadable pipelines",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["diffusers_gfprune", "diffusers_gfprune.*", "pipelines", "pipelines.*"]),
    package_data={"diffusers_gfprune": ["assets/**/*"]},
    include_package_data=True,
    # The model card template lives at the repository root; a non-editable install puts it under share/.
    data_files=[("share/diffusers-gfprune", ["model_card_template.md"])],
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": ["pytest>=8"]},
)
