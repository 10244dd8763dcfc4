from pathlib import Path

from setuptools import find_packages, setup

about: dict = {}
exec((Path(__file__).parent / "python/sglang_dflash/__init__.py").read_text().split('"""', 2)[2], about)

setup(
    name="sglang-dflash",
    version=about["__version__"],
    description="DFLASH block-diffusion speculative decoding for SGLang, on CPU and GPU",
    long_description=(Path(__file__).parent / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    package_dir={"": "python", "dflash_kernels": "kernels"},
    packages=[*find_packages("python"), "dflash_kernels"],
    package_data={"sglang_dflash": ["assets/*.json", "assets/tiny_pair/*.json", "assets/tiny_pair/*/*"]},
    install_requires=["sglang==0.5.23", "safetensors", "tqdm"],
    extras_require={"test": ["pytest", "scipy", "openai", "ruff", "tokenizers", "matplotlib"]},
    # both pass the version gate (`sglang_dflash.plugin.check_sglang_version`): on an SGLang release other than the
    # one pinned above they attach nothing, and a server asking for DFLASH is refused at start
    entry_points={
        "sglang.srt.plugins": ["dflash = sglang_dflash.plugin:register"],
        "sglang.srt.platforms": ["dflash_cpu = sglang_dflash.srt.platform:activate"],
    },
)
