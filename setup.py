"""Build hook: generate the gRPC stubs before packaging, so `pip install -e .` produces them."""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.egg_info import egg_info


def _generate() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent / "tools"))
    import gen_protos

    gen_protos.generate()


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        _generate()
        super().run()


class EggInfoWithProtos(egg_info):
    # Editable installs may skip build_py; egg_info always runs, so generate there too.
    def run(self) -> None:
        _generate()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos, "egg_info": EggInfoWithProtos})
