"""The wheel carries the ejabberd module's sources: erl_shim/ (the repository's source of
truth) becomes pymod_push/erl_shim, which 'pymod-push install' copies to ejabberd."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithShim(build_py):
    def run(self) -> None:
        # a fresh copy: a build folder kept from an older layout would put its modules in
        # the wheel too (pymod_push/install.py beside pymod_push/install/)
        shutil.rmtree(Path(self.build_lib) / "pymod_push", ignore_errors=True)
        super().run()
        source = Path(__file__).resolve().parent / "erl_shim"
        if source.is_dir():  # not when building from an sdist without it
            target = Path(self.build_lib) / "pymod_push" / "erl_shim"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target)  # README.txt, a link, becomes a copy


setup(cmdclass={"build_py": BuildWithShim})
