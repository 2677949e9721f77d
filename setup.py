"""pyproject.toml holds the package's metadata; this only adds docs/config.md to what is built, so the web UI
installed from a wheel has the same help for each key as a source checkout (it reads that file's tables)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithKeyHelp(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:  # an editable install reads docs/config.md from the checkout itself
            target = Path(self.build_lib) / "motiontune" / "ui" / "config.md"
            shutil.copyfile(Path(__file__).parent / "docs" / "config.md", target)


setup(cmdclass={"build_py": BuildWithKeyHelp})
