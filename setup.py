from setuptools import find_packages, setup

setup(
    name="diffusers-pafm",
    version="0.1.0.dev0",
    description="Posterior-Augmented Flow Matching and Variational Flow Maps for Hugging Face diffusers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["diffusers_pafm", "diffusers_pafm.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "diffusers>=0.42",
        "transformers>=4.45",
        "accelerate>=1.0",
        "datasets>=3.0",
        "huggingface_hub>=0.25",
        "peft>=0.13",
        "safetensors>=0.4",
        "open-clip-torch>=2.26",
        "numpy",
        "pillow",
        "tqdm",
    ],
    extras_require={
        # faiss-cpu and faiss-gpu install the same `faiss` module and overwrite each other: pick ONE of these two.
        "knn": ["faiss-cpu>=1.8"],
        "knn-gpu": ["faiss-gpu>=1.7"],
        # Inception features for the Frechet distance (benchmarks' --inception_weights)
        "fid": ["torch-fidelity>=0.3"],
        "dev": [
            "pytest>=8",
            "pytest-timeout",
            "pytest-xdist",
            "ruff>=0.6",
            "scikit-learn",
            "scikit-image",
            "tensorboard",
            "torch-fidelity>=0.3",
        ],
    },
    # model card templates, read with importlib.resources by diffusers_pafm.utils.hub.render_model_card
    package_data={"diffusers_pafm": ["model_cards/*.md"]},
    entry_points={"console_scripts": ["diffusers-pafm-demo=diffusers_pafm.demo:cli"]},
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering :: Artificial Intelligence"],
)
