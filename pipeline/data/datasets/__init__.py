"""Built-in datasets that are generated from installable packages (no downloads at run time).

``openmoji``: OpenMoji art rendered to PNG, captioned with CLDR English names; the project's default
real dataset (see ``data/openmoji/README.md``).
"""

from pipeline.data.datasets.openmoji import OpenmojiBuild, build_openmoji_dataset

__all__ = ["OpenmojiBuild", "build_openmoji_dataset"]
