"""Build vsockcompat: the Cython core over the C core in src/, unless the pure build is asked for.

VSOCKCOMPAT_NO_EXTENSIONS=1 installs the pure-Python core only. Otherwise a
failure to compile the extension fails the build: there is no silent fallback.
"""
import importlib.util
import os

from setuptools import Extension, find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(relpath, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


settings = _load("vsockcompat/_settings.py", "_vsc_settings")
version = _load("vsockcompat/_version.py", "_vsc_version").__version__
clib = _load("vsockcompat/clib.py", "_vsc_clib")
no_extensions = settings.parse_flag("VSOCKCOMPAT_NO_EXTENSIONS", os.environ.get("VSOCKCOMPAT_NO_EXTENSIONS"))


def extensions():
    if no_extensions:
        return []
    from Cython.Build import cythonize

    core = Extension(
        "vsockcompat._cvsc",
        sources=["vsockcompat/_cvsc.pyx", "src/vsc_dgram.c", "src/vsc_ring.c"],
        include_dirs=["src"],
        extra_compile_args=["-std=gnu11", "-O2", "-Wall"],
    )
    return cythonize([core], language_level=3)


with open(os.path.join(HERE, "README.rst"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="vsockcompat",
    version=version,
    description="Run programs written for VMware's VMCI SDK on AF_VSOCK and shared-memory queue pairs",
    long_description=long_description,
    long_description_content_type="text/x-rst",
    license="MIT",
    packages=find_packages(include=["vsockcompat", "vsockcompat.*"]),
    package_data={"vsockcompat": ["*.pyi", "py.typed"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": clib.BuildExtWithLibvmci, "build_py": clib.BuildPyWithHeaders},
    python_requires=">=3.9",
    install_requires=["psutil>=5.9", "tomli>=1.1; python_version < \"3.11\""],
    extras_require={"test": ["pytest>=7", "pytest-timeout>=2.1", "hypothesis>=6"]},
    entry_points={"console_scripts": ["vsockcompat = vsockcompat.cli:main"]},
    classifiers=[
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Cython",
        "Programming Language :: C",
        "Topic :: System :: Networking",
    ],
    zip_safe=False,
)
