from setuptools import find_packages, setup

setup(
    name="pathfm",
    version="0.1.0",
    description="Training pathology foundation models: DINOv2-style ViTs on tiles sampled online from whole-slide images",
    packages=find_packages(include=["pathfm", "pathfm.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.9",  # the oldest on which the distributed tests pass: .ci/oldest_torch.sh
        "torchvision",
        "timm>=1.0.15",
        "numpy",
        "pyyaml",
        "pillow",
        "tensorboard",
        "submitit>=1.5",
        "openslide-python>=1.4",
        "openslide-bin>=4.0",
        "tifffile",
        "simplejpeg",
        "opencv-python-headless",  # the CPU multi-crop's hue rotation and blur (SIMD kernels)
        "imagecodecs",  # tifffile writes the JPEG tiles of synthetic slides with it
        "fvcore",
        "matplotlib",
        "h5py",  # PCam's HDF5 files (eval)
        "tqdm",  # progress bars (slide index build, eval)
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout"],
        "xformers": ["xformers"],
    },
)
