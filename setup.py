from setuptools import find_packages, setup

setup(
    name="egrpo",
    version="0.1.0",
    description="Kernel-backed RL fine-tuning (GRPO, EG-GRPO, STAGE) for autoregressive text-to-image models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["egrpo", "egrpo.*"]),
    # The released CoT reasoning template (rollout.cot_template default) ships inside the wheel.
    package_data={"egrpo.trainer": ["templates/*.txt"]},
    python_requires=">=3.10",
    install_requires=[
        # Ranges, not pins: GPU users keep the CUDA torch they already have. The floors are the oldest versions
        # the suite was run against (README, "Versions"): torch 2.9.1 / 2.11 / 2.13, triton 3.5 / 3.6 / 3.9,
        # transformers 5.17 / 5.23 (4.57 fails: its Janus and LLaVA-OneVision APIs differ).
        "torch>=2.9",
        "triton>=3.5; platform_system == 'Linux'",
        "transformers>=5.17",
        "deepspeed>=0.19",
        "liger-kernel>=0.8",
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
        # `egrpo eval`: spaCy (+ `python -m spacy download en_core_web_sm`) for T2I-CompBench's BLIP-VQA noun chunks,
        # RapidOCR for the OCR accuracy. ImageReward's own package (`image-reward`) is optional and not listed.
        "eval": ["pillow", "rapidocr-onnxruntime>=1.3", "spacy>=3.5,<4"],
        "flash-attn": ["flash-attn>=2.5"],
    },
    entry_points={"console_scripts": ["egrpo=egrpo.cli:main"]},
)
