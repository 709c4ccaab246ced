"""Install wschat; the C accelerator is built when a compiler works, skipped otherwise."""

import logging
import os

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

log = logging.getLogger("wschat.setup")


class OptionalBuildExt(build_ext):
    """Build extensions, but never fail the install over them."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler, no headers, ...
            log.warning("wschat: C accelerator not built (%s); using pure Python", exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            log.warning("wschat: C accelerator not built (%s); using pure Python", exc)


def read(name):
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), encoding="utf-8") as f:
        return f.read()


def version():
    namespace = {}
    exec(read("wschat/_version.py"), namespace)
    return namespace["__version__"]


setup(
    name="wschat",
    version=version(),
    description="A synchronous RFC 6455 WebSocket chat server on the standard library",
    long_description=read("README.rst"),
    long_description_content_type="text/x-rst",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["wschat", "wschat.*"]),
    package_data={"wschat": ["static/*", "py.typed", "_speedups.pyi"]},
    ext_modules=[Extension("wschat._speedups", ["wschat/_speedups.c"], optional=True)],
    cmdclass={"build_ext": OptionalBuildExt},
    extras_require={
        "redis": ["redis[hiredis]>=5"],  # --redis: several processes are one chat (hiredis: +23% fan-out)
        "test": [
            "pytest>=7",
            "pytest-timeout>=2",
            "coverage>=7.10",
            "websockets>=12",
            "wsproto>=1.2",
            "playwright>=1.40",
            "prometheus_client>=0.17",
            "docutils>=0.22",
            "flask>=2.3",
            "gunicorn>=22",
            "django>=4.2",
            "redis[hiredis]>=5",
            "mypy==2.4.1",  # tests/test_layers.py: mypy --strict wschat
            "pyflakes==4.1.0",  # and pyflakes on wschat, tests and tools
            "vermin==1.9.2",  # and that nothing needs a newer Python than python_requires
        ],
        "examples": ["flask>=2.3", "gunicorn>=22", "django>=4.2"],  # README's embedding recipes
        "bench": ["websockets>=12", "redis[hiredis]>=5"],  # python-websockets' servers, and the --redis ones
    },
    entry_points={"console_scripts": ["wschat=wschat.__main__:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Internet :: WWW/HTTP",
        "Topic :: Communications :: Chat",
    ],
)
