"""Dataset sources by ``--data_dir`` prefix.

Adding one: a DataSource subclass in a file here, registered with ``@DATA_SOURCES.register("prefix")``,
and that file's import below.
"""

from kd.data.sources import folder, torchvision_datasets
from kd.data.sources.base import DATA_SOURCES, DataSource, DatasetLayout, LoadOptions, Split, open_source

__all__ = ["DATA_SOURCES", "DataSource", "DatasetLayout", "LoadOptions", "Split", "open_source", "folder",
           "torchvision_datasets"]
