from setuptools import find_packages, setup

setup(
    name="egrpo",
    version="0.1.0",
    description="Kernel-backed RL fine-tuning (GRPO, EG-GRPO, STAGE) for autoregressive text-to-image models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["egrpo", "egrpo.*"]),
    python_requires=">=3.9",
    install_requires=[
        # A range, not a pin: GPU users keep the CUDA torch they already have.
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=4.50",
        "deepspeed>=0.15",
        "liger-kernel>=0.5",
        "numpy",
        "tqdm",
        "pyyaml",
        "safetensors",
        "matplotlib",
        "tensorboard",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "pytest-xdist>=3", "pillow", "rapidocr-onnxruntime>=1.3"],
        # Reward adapters: OCR engine with bundled ONNX models (CPU onnxruntime; no torch dependency), optional
        # scipy for p-values (egrpo.tools.stats has its own fallback). Model-based adapters only need transformers.
        "rewards": ["pillow", "rapidocr-onnxruntime>=1.3", "scipy"],
        "flash-attn": ["flash-attn>=2.5"],
    },
    entry_points={"console_scripts": ["egrpo=egrpo.cli:main"]},
)
