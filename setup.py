"""mmcl: multimodal contrastive learning in JAX/Flax (CLIP, SigLIP, LIMoE)."""
import setuptools

# Ranges are the ones tested here (Python 3.11, CPU): widen only after testing.
INSTALL_REQUIRES = [
    "jax>=0.10.0,<0.11",
    "jaxlib>=0.10.0,<0.11",
    "flax>=0.12.0,<0.13",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.12.0,<0.13",
    "ml-collections>=1.0,<2",
    "absl-py>=2.0,<3",
    "numpy>=2.0,<3",
    "scipy>=1.13,<2",  # mmcl/evaluate/linear_probe.py (L-BFGS); jax needs it too
    "tensorflow-cpu>=2.20,<2.22",
    "tensorflow-datasets>=4.9.8,<4.10",
    "sentencepiece>=0.2,<0.3",
    "safetensors>=0.8,<0.9",  # mmcl.convert (open_clip weights in and out)
    "tensorboardX>=2.6,<3",
    "tqdm>=4.66,<5",
    "matplotlib>=3.11,<4",  # tools/plot_experts.py, tools/report.py
]

setuptools.setup(
    name="mmcl",
    version="0.1.0",
    description="Multimodal contrastive learning (CLIP, SigLIP, LIMoE) in JAX/Flax.",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["mmcl", "mmcl.*"]),
    package_data={"mmcl": ["**/*.txt", "**/*.json"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={"wandb": ["wandb>=0.19,<0.32"],  # config.wandb (mmcl/train/wandb_run.py)
                    "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4",
                             # The TPU compiler, for ahead-of-time compiles without a TPU
                             # (tools/compile.py): the version jax[tpu]==0.10.2 pins.
                             "libtpu==0.0.42.*; platform_system == 'Linux' and platform_machine == 'x86_64'",
                             # Executing notebooks/ in the tests.
                             "nbclient>=0.10,<0.12", "nbformat>=5.10,<6", "ipykernel>=6.29,<8"]},
)
