"""Data layer: sources → one cached uint8 form → batches.

``import_dataset`` decodes a folder, archive, CSV-labelled folder or CIFAR batches once
into the cache; ``load_dataset`` opens it memory-mapped; ``BatchLoader`` (in
``imgclf.data.loader``, which needs torch) serves augmented batches from it.
"""

from imgclf.data.cache import Dataset, list_datasets, load_dataset
from imgclf.data.download import import_named
from imgclf.data.importer import import_dataset
from imgclf.data.info import dataset_info

__all__ = [
    "Dataset",
    "dataset_info",
    "import_dataset",
    "import_named",
    "list_datasets",
    "load_dataset",
]
