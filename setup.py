"""Install diffusers-gfprune with the exact versions it is tested against.

torch and torchvision are pinned together: torch-fidelity needs torchvision, and a torchvision
built for another torch breaks ``import diffusers`` (``operator torchvision::nms does not exist``).
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "diffusers==0.42.1",
    "torch-pruning==1.6.1",
    "torch-fidelity==0.4.0",
    "accelerate==1.15.0",
    "huggingface_hub==2.4.0",
    "datasets==5.2.0",
    "safetensors==0.8.0",
    "scikit-learn==1.9.1",
    "scikit-image==0.26.0",  # ships the photographs of the built-in "photos" data set
    "scipy==1.17.1",
    "numpy==2.4.6",
    "torchmetrics==1.9.0",
    "matplotlib==3.11.2",
    "pillow==13.0.0",
    "tqdm==4.70.1",
    "tensorboard==2.21.0",  # the scripts' default tracker (--report_to tensorboard), as in diffusers' examples
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
    extras_require={"test": ["pytest==9.2.0"]},
)
