"""Dataset sources by ``--data_dir`` prefix.

Adding one: a DataSource subclass in a file here, registered with ``@SOURCES.register("prefix")``,
and that file's import below.
"""

from kd.data.sources import folder, torchvision_datasets
from kd.data.sources.base import SOURCES, DataSource, DatasetLayout, LoadOptions, Split, open_source

__all__ = ["SOURCES", "DataSource", "DatasetLayout", "LoadOptions", "Split", "open_source", "folder",
           "torchvision_datasets"]
